"""The folders of a save: their names, the tracker file, finding a checkpoint, atomic publish and pruning.

On disk:

    SAVE_DIR/
      latest_checkpointed_iteration.txt   iteration of the newest complete checkpoint, "N\\n" (atomic write)
      iter_0000100/                        one complete checkpoint
        metadata.json, common.pt, .metadata, __*_*.distcp     megatron-core / torch DCP files
        checksums.json                     ours: size and sha256 of every file above (integrity.py)
        tempnet_checkpoint.json            ours: format, iteration, consumed samples, config, layout
      .tmp_iter_0000110/                   a save in progress, or one that was interrupted: never loaded
      .old_iter_0000100/                   a complete checkpoint being replaced by a new save of its iteration

tempnet_checkpoint.json (JSON, indent 1) holds {"format": "megatron-tempnet", "format_version": 1,
"iteration", "consumed_samples", "contents" (["model"] or ["model", "optimizer", "scheduler", "rng"]),
"layout" ({"tp", "pp", "dp", "world", "vpp"}), "config" (the run's Config.to_dict())}. Its presence
makes a folder a complete checkpoint.

A save writes everything into `.tmp_iter_N`; then rank 0 writes tempnet_checkpoint.json, renames the
folder to `iter_N`, and only then replaces the tracker file. A crash at any point leaves the tracker
naming the previous complete checkpoint. Only the newest `--keep-last` checkpoints are kept (0 keeps all).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional

from ..config import ConfigError
from ..files import atomic_write_text, fsync_dir

TRACKER_FILE = "latest_checkpointed_iteration.txt"
INFO_FILE = "tempnet_checkpoint.json"
FORMAT = "megatron-tempnet"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp_"
OLD_PREFIX = ".old_"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be saved or loaded. The message names the problem and the fix."""


def iter_dir_name(iteration: int) -> str:
    """The folder name of the checkpoint of `iteration`, e.g. iter_0000100."""
    return f"iter_{iteration:07d}"


def read_info(ckpt_dir: str | os.PathLike) -> dict:
    """The tempnet_checkpoint.json of one iteration folder (raises CheckpointError if it is not one)."""
    d = Path(ckpt_dir)
    info_path = d / INFO_FILE
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} does not exist; pass an existing save folder or iter_N folder")
    if not info_path.is_file():
        if d.name.startswith(TMP_PREFIX) or (d / "metadata.json").is_file() or any(d.glob("*.distcp")):
            raise CheckpointError(
                f"checkpoint {d} is incomplete (no {INFO_FILE}): its save was interrupted; load the save folder "
                f"{d.parent} (its tracker names the last complete checkpoint) or another iter_N folder")
        raise CheckpointError(
            f"{d} is not a megatron-tempnet checkpoint (no {INFO_FILE}); pass a folder written with --save "
            f"or by tools/convert_to_hf.py --from-hf")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{info_path} is unreadable ({err}); the checkpoint is damaged, load another one") from None
    if info.get("format") != FORMAT or not isinstance(info.get("format_version"), int):
        raise CheckpointError(f"{info_path} is not a {FORMAT} checkpoint description")
    if info["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{d} was written by a newer megatron-tempnet (format {info['format_version']} > {FORMAT_VERSION}); "
            "upgrade megatron-tempnet to load it")
    if not (d / "metadata.json").is_file():
        raise CheckpointError(f"checkpoint {d} is incomplete (no metadata.json); load another one")
    return info


def complete_checkpoints(save_dir: str | os.PathLike) -> List[Path]:
    """The complete iter_N folders of a save folder, oldest first."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith("iter_") and p.name[5:].isdigit() and (p / INFO_FILE).is_file():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def _follow_tracker(save_dir: Path, tracker: Path) -> Path:
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(
            f"{tracker} holds {text!r}, not an iteration number; fix or delete it, or pass one iter_N folder")
    target = save_dir / iter_dir_name(int(text))
    if not (target / INFO_FILE).is_file():
        complete = complete_checkpoints(save_dir)
        fix = (f"the newest complete checkpoint is {complete[-1]}: resume with --load {complete[-1]}" if complete
               else f"{save_dir} holds no complete checkpoint: drop --load to start from scratch")
        raise CheckpointError(f"{tracker} names iteration {int(text)} but {target} is missing or incomplete; {fix}")
    read_info(target)
    return target


def resolve_checkpoint(path: str | os.PathLike, *, allow_empty: bool = False) -> Optional[Path]:
    """The iteration folder to load for `path`: a save folder (its tracker is followed) or one iter_N
    folder. Returns None for an empty (or absent) save folder when `allow_empty`; otherwise a missing or
    incomplete checkpoint is a CheckpointError that says what to do."""
    p = Path(path)
    if (p / INFO_FILE).is_file() or p.name.startswith(TMP_PREFIX) or (p / "metadata.json").is_file():
        read_info(p)  # checks completeness
        return p
    if not p.exists():
        if allow_empty:
            return None
        raise CheckpointError(
            f"checkpoint folder {p} does not exist; check the path, or drop --load to start from scratch "
            "(with --load equal to --save, a run starts from scratch until its first save)")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a checkpoint folder; pass a folder written with --save")
    tracker = p / TRACKER_FILE
    if tracker.is_file():
        return _follow_tracker(p, tracker)
    complete = complete_checkpoints(p)
    if complete:
        raise CheckpointError(
            f"{p} has no {TRACKER_FILE}, so which checkpoint is the latest is unknown; pass one iter_N folder "
            f"directly (found: {', '.join(c.name for c in complete)})")
    if allow_empty:
        return None
    partial = sorted(q.name for q in p.iterdir() if q.name.startswith(TMP_PREFIX))
    hint = f" (only interrupted saves: {', '.join(partial)})" if partial else ""
    raise CheckpointError(
        f"{p} holds no checkpoint{hint}; pass a folder written with --save, or drop --load to start from scratch")


def temporary_folder(save_dir: Path, iteration: int) -> Path:
    """Where the save of `iteration` is written before it is published: SAVE_DIR/.tmp_iter_N."""
    return save_dir / f"{TMP_PREFIX}{iter_dir_name(iteration)}"


def prepare_temporary_folder(tmp: Path) -> None:
    """Rank 0: make `tmp` an empty folder (a leftover of an interrupted save of the same iteration is removed)."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


def publish_checkpoint(tmp: Path, info: dict, iteration: int,
                       renamed: Callable[[Path], None] = lambda final: None) -> Path:
    """Rank 0: publish a fully written `.tmp_iter_N` folder as `iter_N` (see the module docstring) and
    return it. `renamed(final)` runs after the rename, before the tracker moves."""
    root, name = tmp.parent, iter_dir_name(iteration)
    final = root / name
    atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=1))
    fsync_dir(tmp)
    old = None
    if final.exists():  # the same iteration saved before (a run resumed from an earlier checkpoint)
        old = root / f"{OLD_PREFIX}{name}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    renamed(final)
    atomic_write_text(root / TRACKER_FILE, f"{iteration}\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune_checkpoints(root: Path, keep_last: int, current: int) -> None:
    """Rank 0: drop stale temporary folders and all but the newest `keep_last` checkpoints (up to `current`)."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(OLD_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
    if keep_last and keep_last > 0:
        complete = [p for p in complete_checkpoints(root) if int(p.name[5:]) <= current]
        for p in complete[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
