"""megatron_tempnet/files.py: the one sha256 of a file and the one atomic write."""
import hashlib
import os

import pytest

from megatron_tempnet.files import atomic_write_bytes, atomic_write_text, sha256_file


def test_sha256_file_equals_hashlib_over_the_bytes(tmp_path):
    data = os.urandom((5 << 20) + 123)  # more than one 4 MiB block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(str(tmp_path / "empty")) == hashlib.sha256(b"").hexdigest()


def test_atomic_writes_replace_the_file_and_leave_nothing_else(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "first\n")
    atomic_write_text(target, '{"ü": 1}\n')
    assert target.read_bytes() == '{"ü": 1}\n'.encode()
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "out.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
