"""benchmarks/tempnet_ablation.py end to end on synthetic tokens: fresh processes per (arm, seed), then the JSONL,
the markdown table with its verdict and command, and the PNG."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_script_end_to_end(tmp_path):
    prefix = str(tmp_path / "out" / "ablation")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "tempnet_ablation.py"), "--scale", "test", "--mock-data",
           "--arms", "baseline", "tempnet_dro", "--seeds", "1", "2", "--threads", "1",
           "--work-dir", str(tmp_path / "work"), "--output-prefix", prefix]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(prefix + ".jsonl")]
    stdout_rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows == stdout_rows
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("baseline", 1), ("baseline", 2),
                                                          ("tempnet_dro", 1), ("tempnet_dro", 2)]
    for r in rows:
        assert r["train_iters"] == 4 and len(r["curve"]) == 2 and r["heldout_tokens"] == 8 * 16
        for key in ("ppl_tau1", "ppl_tau", "ece_tau1", "ece_tau", "tau_mean", "tau_std", "acc"):
            assert r[key] == r[key], key  # not NaN
    base = [r for r in rows if r["arm"] == "baseline"]
    assert all(r["tau_mean"] == 1.0 and r["ppl_tau"] == r["ppl_tau1"] for r in base)
    report = open(prefix + ".md").read()
    assert "## Verdict" in report and "In plain words" in report and "--mock-data" in report
    assert "| (4) TempNet + DRO | 2 |" in report
    with open(prefix + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
