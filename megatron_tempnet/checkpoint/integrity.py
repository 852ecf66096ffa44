"""Checksums of a checkpoint's files: recorded when it is published, verified before it is loaded.

checksums.json (JSON, indent 1): {"algorithm": "sha256", "files": {file name: {"bytes": int, "sha256": hex}}}
for every file of the iter_N folder but itself and tempnet_checkpoint.json.

torch DCP reads whatever bytes a .distcp file holds: 64 flipped bytes load without complaint and give a
model that generates garbage, and a deleted file fails deep inside DCP with a long traceback. So a save
records the size and sha256 of every file of the checkpoint in `checksums.json` (written before
tempnet_checkpoint.json, which publishes the folder), and a load first checks:
- always: every file is present with its recorded size, and every byte range DCP's .metadata points into
  lies inside its file (this also covers checkpoints written before checksums were recorded);
- by default: the sha256 of every file (`--no-verify-checkpoint` skips it).
The ranks share the work: rank r hashes files r, r + world, ... (about 2 GB/s per rank on one core).
A damaged checkpoint is refused with the file, what is wrong with it, and the newest intact checkpoint
of the same save folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch.distributed as dist

from ..files import atomic_write_text, sha256_file
from .folders import CheckpointError, complete_checkpoints
from .safe_load import safe_fs_reader

CHECKSUM_FILE = "checksums.json"
_UNHASHED = {CHECKSUM_FILE, "tempnet_checkpoint.json"}  # written after the checksums


def _rank_world() -> tuple:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(items: list, fn) -> list:
    """fn over this rank's share of `items`; the results of all ranks, in the order of `items`' shares."""
    rank, world = _rank_world()
    mine = [fn(x) for x in items[rank::world]]
    if world == 1:
        return mine
    gathered: List[Optional[list]] = [None] * world
    dist.all_gather_object(gathered, mine)
    return [r for part in gathered for r in part]


def record_checksums(folder: Path) -> None:
    """Called on every rank once all files of the checkpoint are written into `folder`; rank 0 writes
    checksums.json. {file name: {"bytes", "sha256"}} for every file except the description files."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in _UNHASHED)
    entries = _share(names, lambda n: (n, {"bytes": (folder / n).stat().st_size,
                                           "sha256": sha256_file(str(folder / n))}))
    if _rank_world()[0] == 0:
        atomic_write_text(folder / CHECKSUM_FILE, json.dumps({"algorithm": "sha256", "files": dict(entries)}, indent=1))


def _dcp_ranges(folder: Path) -> Dict[str, int]:
    """Bytes each .distcp file must have at least, from DCP's .metadata (read with the safe unpickler)."""
    need: Dict[str, int] = {}
    metadata = safe_fs_reader(folder).read_metadata()
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return need


def _file_problem(folder: Path, name: str, entry: Optional[dict], need: int, hashes: bool) -> Optional[str]:
    path = folder / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if entry is not None and size != entry["bytes"]:
        return f"{name} has {size} bytes, {entry['bytes']} were written"
    if size < need:
        return f"{name} has {size} bytes, but the checkpoint's index reads up to byte {need}"
    if hashes and entry is not None and sha256_file(str(path)) != entry["sha256"]:
        return f"{name} differs from what was written (its sha256 changed)"
    return None


def checkpoint_problems(folder: str | os.PathLike, *, hashes: bool = True) -> tuple:
    """(problems, verified): what is wrong with the files of one iter_N folder (an empty list when nothing
    is), and whether it has recorded checksums. Collective when torch.distributed is initialised."""
    folder = Path(folder)
    recorded = None
    if (folder / CHECKSUM_FILE).is_file():
        try:
            recorded = json.loads((folder / CHECKSUM_FILE).read_text())["files"]
        except (OSError, ValueError, KeyError):
            return [f"{CHECKSUM_FILE} is unreadable"], False
    try:
        need = _dcp_ranges(folder)
    except Exception as err:  # a damaged .metadata: whatever the unpickler or the reader raises
        return [f".metadata is unreadable ({type(err).__name__}: {str(err)[:200]})"], recorded is not None
    names = sorted(set(need) | set(recorded or {}))
    problems = _share(names, lambda n: _file_problem(folder, n, (recorded or {}).get(n), need.get(n, 0), hashes))
    return [p for p in problems if p], recorded is not None


def last_intact_checkpoint(save_dir: Path, but: Path) -> Optional[Path]:
    """The newest complete checkpoint of `save_dir` other than `but` whose files have their sizes (hashes are
    not read: this names a candidate, and loading it verifies it in full)."""
    for candidate in reversed(complete_checkpoints(save_dir)):
        if candidate.resolve() != but.resolve() and not checkpoint_problems(candidate, hashes=False)[0]:
            return candidate
    return None


def verify_checkpoint(folder: Path, *, hashes: bool = True) -> bool:
    """Refuse a damaged checkpoint (CheckpointError naming the file and the newest intact checkpoint);
    return whether it was verified against recorded checksums (False: written before they were)."""
    problems, verified = checkpoint_problems(folder, hashes=hashes)
    if problems:
        good = last_intact_checkpoint(folder.parent, folder)
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        fix = (f"the newest intact checkpoint is {good}: resume with --load {good}" if good else
               f"{folder.parent} holds no other intact checkpoint: start again, or restore the files from a copy")
        raise CheckpointError(f"checkpoint {folder} is damaged: {problems[0]}{more}; {fix}")
    return verified
