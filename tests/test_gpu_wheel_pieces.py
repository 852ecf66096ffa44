"""examples/gpu/wheel_pieces.py rehearsed on a small synthetic file, without network: the pieces join back to
the published sha256, and every corrupted or missing input is refused with one line, leaving no partial wheel."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "gpu" / "wheel_pieces.py"
spec = importlib.util.spec_from_file_location("wheel_pieces", SCRIPT)
wp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wp)

WHEEL = "fake_core-1.0-py3-none-any.whl"


def _pip_report(path: Path, files: dict) -> Path:
    """A pip `--report` file as pip writes it: one install item per file, the index link's sha256."""
    items = [{"download_info": {"url": f"https://files.example/{name}",
                                "archive_info": {"hash": f"sha256={digest}", "hashes": {"sha256": digest}}}}
             for name, digest in files.items()]
    path.write_text(json.dumps({"version": "1", "install": items}))
    return path


@pytest.fixture
def downloaded(tmp_path):
    """A download folder with one large and one small file, their published hashes and a split manifest."""
    dl = tmp_path / "dl"
    dl.mkdir()
    big = os.urandom(10_000) * 3 + b"tail"  # 30004 bytes: pieces of 8 KiB leave a short last one
    (dl / WHEEL).write_bytes(big)
    (dl / "small-0.1.whl").write_bytes(b"small wheel")
    published = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dl.iterdir()}
    report = _pip_report(tmp_path / "report.json", published)
    manifest = tmp_path / "wheels.json"
    wp.record(dl, [report], manifest)
    wp.split(dl / WHEEL, tmp_path / "root", 8192, manifest)
    return tmp_path, big, published, manifest


def test_pieces_join_to_the_published_sha256(downloaded):
    tmp, big, published, manifest = downloaded
    m = wp.load_manifest(manifest)
    pieces = m["split"]["pieces"]
    assert [p["size"] for p in pieces] == [8192, 8192, 8192, 30004 - 3 * 8192]
    assert [p["folder"] for p in pieces] == ["part-00", "part-01", "part-02", "part-03"]  # one folder per transfer
    assert m["split"]["sha256"] == published[WHEEL]
    target = wp.join(tmp / "root", tmp / "joined", m)
    assert target.read_bytes() == big and hashlib.sha256(target.read_bytes()).hexdigest() == published[WHEEL]
    assert wp.check_files(tmp / "dl", m) == sorted(published)


def test_corrupted_piece_is_refused_and_nothing_is_joined(downloaded):
    tmp, _, _, manifest = downloaded
    m = wp.load_manifest(manifest)
    piece = tmp / "root" / "part-02" / f"{WHEEL}.part-02"
    data = bytearray(piece.read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped
    piece.write_bytes(bytes(data))
    with pytest.raises(wp.Refused, match="piece 2 .* has sha256 .* the manifest says .*transfer it again"):
        wp.join(tmp / "root", tmp / "joined", m)
    assert not (tmp / "joined").exists() or not any((tmp / "joined").iterdir())
    wp.check_pieces(tmp / "root", m, [0, 1, 3])  # the others still check out


def test_missing_and_truncated_pieces_are_refused(downloaded):
    tmp, _, _, manifest = downloaded
    m = wp.load_manifest(manifest)
    (tmp / "root" / "part-01" / f"{WHEEL}.part-01").unlink()
    with pytest.raises(wp.Refused, match="piece 1 is missing .* carry .*part-01 in a run call"):
        wp.check_pieces(tmp / "root", m)
    last = tmp / "root" / "part-03" / f"{WHEEL}.part-03"
    last.write_bytes(last.read_bytes()[:-1])
    with pytest.raises(wp.Refused, match="piece 3 .* bytes, the manifest says"):
        wp.check_pieces(tmp / "root", m, [3])
    with pytest.raises(wp.Refused, match="piece 7 does not exist"):
        wp.check_pieces(tmp / "root", m, [7])


def test_joined_file_checked_against_the_whole_sha256(downloaded):
    """Pieces that agree with a tampered manifest still do not make a wheel with another sha256."""
    tmp, _, _, manifest = downloaded
    m = wp.load_manifest(manifest)
    m["split"]["sha256"] = "0" * 64
    with pytest.raises(wp.Refused, match="the joined .* has sha256"):
        wp.join(tmp / "root", tmp / "joined", m)
    assert list((tmp / "joined").iterdir()) == []


def test_download_that_differs_from_the_published_hash_is_refused(tmp_path):
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / WHEEL).write_bytes(b"what arrived")
    report = _pip_report(tmp_path / "r.json", {WHEEL: hashlib.sha256(b"what PyPI has").hexdigest()})
    with pytest.raises(wp.Refused, match="differs from the published"):
        wp.record(dl, [report], tmp_path / "wheels.json")
    assert not (tmp_path / "wheels.json").exists()


def test_small_file_not_in_manifest_or_changed_is_refused(downloaded):
    tmp, _, _, manifest = downloaded
    m = wp.load_manifest(manifest)
    (tmp / "dl" / "small-0.1.whl").write_bytes(b"changed")
    with pytest.raises(wp.Refused, match="small-0.1.whl has sha256"):
        wp.check_files(tmp / "dl", m)
    (tmp / "dl" / "small-0.1.whl").unlink()
    (tmp / "dl" / "stranger.whl").write_bytes(b"x")
    with pytest.raises(wp.Refused, match="stranger.whl is not in the manifest"):
        wp.check_files(tmp / "dl", m)


def test_cli_refuses_with_one_line(downloaded):
    tmp, _, _, manifest = downloaded
    piece = tmp / "root" / "part-00" / f"{WHEEL}.part-00"
    piece.write_bytes(b"\0" * 8192)
    out = subprocess.run([sys.executable, str(SCRIPT), "--manifest", str(manifest), "join", "--root",
                          str(tmp / "root"), "--out", str(tmp / "joined")], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("refused: piece 0 ")
    out = subprocess.run([sys.executable, str(SCRIPT), "--manifest", str(manifest), "check", "--root",
                          str(tmp / "root"), "--pieces", "1,2"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count("ok  ") == 2


def test_tracked_manifest_describes_pieces_under_one_transfer():
    """The committed manifest: every piece under 60 MiB, pieces adding up to the published wheel."""
    m = wp.load_manifest(wp.MANIFEST)
    s = m["split"]
    assert s["sha256"] == m["files"][s["file"]]["sha256"] and s["size"] == m["files"][s["file"]]["size"]
    assert sum(p["size"] for p in s["pieces"]) == s["size"]
    assert all(p["size"] < 60 * 2**20 for p in s["pieces"])
    small = sum(info["size"] for name, info in m["files"].items() if name != s["file"])
    assert small < 16 * 2**20  # the small files travel in a call of their own, with the loss-kernel check
