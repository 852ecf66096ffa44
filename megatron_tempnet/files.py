"""File helpers every writer of the project shares: the sha256 of a file, and atomic writes.

An atomic write puts the bytes into a temporary file beside the target (a hidden name, with the process
id, so two writers never share one), fsyncs it, renames it over the target and fsyncs the folder: a
reader sees the old file or the new one, never half of one, and after a crash the rename is durable.
A write that fails removes its temporary file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASH_BLOCK = 1 << 22  # bytes read at a time while hashing


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so a rename inside it survives a crash (best effort: some file systems refuse)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (see the module docstring)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text` (encoded with `encoding`) atomically."""
    atomic_write_bytes(path, text.encode(encoding))
