"""Carry a wheel too large for one transfer to the GPU machine in pieces, checked by sha256 at every step.

The manifest (examples/gpu/wheels.json, tracked) records the sha256 that PyPI publishes for every downloaded
file, and for the large wheel the size and sha256 of each piece. It travels with the working tree, so the GPU
machine checks what arrived against hashes taken here. Standard library only (runs on any Python 3.8+).

    python examples/gpu/wheel_pieces.py record --dir .gpu-wheels/dl --report r1.json [--report r2.json ...]
    python examples/gpu/wheel_pieces.py split --dir .gpu-wheels/dl --root .gpu-wheels --max-mib 58
    python examples/gpu/wheel_pieces.py check --root .gpu-wheels --pieces 0        # after each transfer
    python examples/gpu/wheel_pieces.py join --root .gpu-wheels --out .gpu-wheels/joined
    python examples/gpu/wheel_pieces.py check-files --dir .gpu-wheels/small         # the small wheels

Every failure is one line on stderr starting with "refused:" and exit status 1; a join that fails leaves no
partial wheel behind.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable, List, Optional

MANIFEST = Path(__file__).with_name("wheels.json")
BLOCK = 1 << 20  # bytes read at a time while hashing / copying


class Refused(Exception):
    """A check failed; the message is the one line the user sees."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(path: Path) -> dict:
    if not path.is_file():
        raise Refused(f"manifest {path} not found; run `wheel_pieces.py record` and `split` where the wheels were downloaded")
    return json.loads(path.read_text())


def save_manifest(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def published_hashes(reports: Iterable[Path]) -> dict:
    """{file name: sha256} from `pip install --dry-run --report` files: the hashes of PyPI's index links."""
    hashes = {}
    for report in reports:
        for item in json.loads(Path(report).read_text())["install"]:
            info = item["download_info"]
            name = info["url"].rsplit("/", 1)[1].split("#")[0]
            archive = info.get("archive_info", {})
            digest = archive.get("hashes", {}).get("sha256") or archive.get("hash", "").partition("sha256=")[2]
            if not digest:
                raise Refused(f"pip report {report} gives no sha256 for {name}")
            hashes[name] = digest
    return hashes


def record(directory: Path, reports: List[Path], manifest_path: Path) -> dict:
    """Check every file in `directory` against its published sha256 and write the manifest's `files` section."""
    published = published_hashes(reports)
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        if path.name not in published:
            raise Refused(f"{path.name} is not in any pip report; download it with download_wheels.sh")
        digest = sha256_of(path)
        if digest != published[path.name]:
            raise Refused(f"{path.name}: sha256 {digest} differs from the published {published[path.name]}; download it again")
        files[path.name] = {"sha256": digest, "size": path.stat().st_size}
    missing = sorted(set(published) - set(files))
    if missing:
        raise Refused(f"pip reported {', '.join(missing)} but {directory} lacks them; download them again")
    manifest = load_manifest(manifest_path) if manifest_path.is_file() else {}
    manifest["files"] = files
    save_manifest(manifest_path, manifest)
    return manifest


def piece_folder(root: Path, index: int) -> Path:
    """Each piece in its own folder, so that one device transfer carries exactly one of them."""
    return root / f"part-{index:02d}"


def split(wheel: Path, root: Path, max_bytes: int, manifest_path: Path) -> dict:
    """Cut `wheel` into pieces of at most max_bytes under root/part-NN/ and record them in the manifest."""
    manifest = load_manifest(manifest_path)
    if wheel.name not in manifest.get("files", {}):
        raise Refused(f"{wheel.name} has no published sha256 in {manifest_path}; run `record` first")
    whole = sha256_of(wheel)
    if whole != manifest["files"][wheel.name]["sha256"]:
        raise Refused(f"{wheel.name}: sha256 {whole} differs from the published one; download it again")
    pieces = []
    with open(wheel, "rb") as f:
        index = 0
        while True:
            data = f.read(max_bytes)
            if not data:
                break
            folder = piece_folder(root, index)
            folder.mkdir(parents=True, exist_ok=True)
            piece = folder / f"{wheel.name}.part-{index:02d}"
            piece.write_bytes(data)
            pieces.append({"folder": folder.name, "name": piece.name, "size": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
            index += 1
    manifest["split"] = {"file": wheel.name, "size": wheel.stat().st_size, "sha256": whole, "pieces": pieces}
    save_manifest(manifest_path, manifest)
    return manifest


def check_pieces(root: Path, manifest: dict, indices: Optional[List[int]] = None) -> List[Path]:
    """Verify the given pieces (all by default) against the manifest; returns their paths in order."""
    pieces = manifest["split"]["pieces"]
    indices = list(range(len(pieces))) if indices is None else indices
    paths = []
    for i in indices:
        if not 0 <= i < len(pieces):
            raise Refused(f"piece {i} does not exist: the manifest has pieces 0..{len(pieces) - 1}")
        entry = pieces[i]
        path = root / entry["folder"] / entry["name"]
        if not path.is_file():
            raise Refused(f"piece {i} is missing at {path}; carry {root / entry['folder']} in a run call")
        size = path.stat().st_size
        if size != entry["size"]:
            raise Refused(f"piece {i} ({path}) has {size} bytes, the manifest says {entry['size']}; transfer it again")
        digest = sha256_of(path)
        if digest != entry["sha256"]:
            raise Refused(f"piece {i} ({path}) has sha256 {digest}, the manifest says {entry['sha256']}; transfer it again")
        paths.append(path)
    return paths


def join(root: Path, out_dir: Path, manifest: dict) -> Path:
    """Verify every piece, concatenate them into out_dir/<wheel>, verify the whole; nothing is left on failure."""
    split_info = manifest["split"]
    paths = check_pieces(root, manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / split_info["file"]
    partial = target.with_name(target.name + ".partial")
    h = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for path in paths:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(BLOCK), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != split_info["sha256"]:
            raise Refused(f"the joined {target.name} has sha256 {h.hexdigest()}, the manifest says "
                          f"{split_info['sha256']}; the manifest and the pieces disagree, split again")
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()
    return target


def check_files(directory: Path, manifest: dict) -> List[str]:
    """Verify every file in `directory` that the manifest lists; refuse files it does not list."""
    files = manifest["files"]
    seen = []
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        if path.name not in files:
            raise Refused(f"{path} is not in the manifest; remove it or record it")
        digest = sha256_of(path)
        if digest != files[path.name]["sha256"]:
            raise Refused(f"{path} has sha256 {digest}, the manifest says {files[path.name]['sha256']}; transfer it again")
        seen.append(path.name)
    return seen


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="check downloads against PyPI's sha256 (pip reports); write the manifest")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--report", type=Path, action="append", required=True)
    s = sub.add_parser("split", help="cut the largest file of --dir into pieces, one folder each")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--root", type=Path, required=True)
    s.add_argument("--max-mib", type=float, default=58.0)
    c = sub.add_parser("check", help="verify pieces that have arrived")
    c.add_argument("--root", type=Path, required=True)
    c.add_argument("--pieces", default=None, help="comma list of piece numbers (default: all)")
    j = sub.add_parser("join", help="verify all pieces, join them, verify the wheel")
    j.add_argument("--root", type=Path, required=True)
    j.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("check-files", help="verify the files of a folder against the manifest")
    f.add_argument("--dir", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        if a.cmd == "record":
            files = record(a.dir, a.report, a.manifest)["files"]
            for name, info in sorted(files.items()):
                print(f"published sha256 matches  {info['sha256']}  {name}")
        elif a.cmd == "split":
            if not 0 < a.max_mib < 64:
                raise Refused(f"--max-mib must be in (0, 64): one device transfer carries at most 64 MiB; got {a.max_mib}")
            wheel = max((q for q in a.dir.iterdir() if q.is_file()), key=lambda q: q.stat().st_size)
            info = split(wheel, a.root, int(a.max_mib * 2**20), a.manifest)["split"]
            print(f"whole  {info['sha256']}  {info['file']}  {info['size']} bytes")
            for piece in info["pieces"]:
                print(f"piece  {piece['sha256']}  {piece['folder']}/{piece['name']}  {piece['size']} bytes")
        elif a.cmd == "check":
            manifest = load_manifest(a.manifest)
            indices = None if a.pieces is None else [int(x) for x in a.pieces.split(",") if x != ""]
            for path in check_pieces(a.root, manifest, indices):
                print(f"ok  {path}")
        elif a.cmd == "join":
            manifest = load_manifest(a.manifest)
            target = join(a.root, a.out, manifest)
            print(f"joined and verified  {manifest['split']['sha256']}  {target}")
        else:
            for name in check_files(a.dir, load_manifest(a.manifest)):
                print(f"ok  {a.dir / name}")
    except Refused as err:
        print(f"refused: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
