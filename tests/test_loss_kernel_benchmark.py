"""benchmarks/loss_kernel.py end to end on a small shape: one JSON row per method, each measured in its own
subprocess, with the requested temperature range."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rows_for_low_temperatures():
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "loss_kernel.py"), "--shapes", "512x2048x32",
         "--kinds", "loss", "--methods", "reference,torch", "--filter-eps", "", "--tau-range", "0.01,0.1"],
        capture_output=True, text=True, check=True, cwd=REPO)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == ["reference", "torch"]
    for r in rows:
        assert "error" not in r, r
        assert r["tau_range"] == [0.01, 0.1] and r["seconds"] > 0 and r["peak_mb"] >= 0
    assert rows[1]["peak_ratio"] > 0  # the fused row is compared with the reference row of the same shape


def test_bad_tau_range_is_refused():
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "loss_kernel.py"), "--tau-range", "0,1"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "0 < LO <= HI" in out.stderr and not out.stdout
