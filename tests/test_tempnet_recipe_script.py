"""benchmarks/tempnet_recipe.py end to end on synthetic tokens: one process per seed running every setting, then
the JSONL with the required keys, the markdown table with its checks and verdicts, and the PNG."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("setting", "arm", "seed", "tau_std", "spearman_tau_opt", "spearman_tau_entropy", "heldout_nll_tau1",
        "heldout_nll_own_tau", "heldout_nll_best_global", "heldout_ece_own_tau")


def test_script_end_to_end(tmp_path):
    prefix = str(tmp_path / "out" / "recipe")
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "tempnet_recipe.py"), "--scale", "test", "--mock-data",
           "--seeds", "1", "--work-dir", str(tmp_path / "work"), "--output-prefix", prefix]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(prefix + ".jsonl")]
    assert rows == [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["setting"], r["arm"]) for r in rows] == (
        [("baseline", "ce")] + [("frozen", f"{o}/{v}") for o in ("dro", "tau_ce") for v in ("normalized", "max_shifted", "scale")]
        + [("scratch", "dro/normalized"), ("finetune", "dro/normalized")])
    for r in rows:
        assert all(k in r for k in KEYS), r
    base = rows[0]
    assert base["tau_std"] == 0 and base["heldout_nll_own_tau"] == base["heldout_nll_tau1"]
    frozen = [r for r in rows if r["setting"] == "frozen"]
    assert all(r["heldout_nll_tau1"] == pytest.approx(base["heldout_nll_tau1"]) for r in frozen)  # the same frozen LM
    report = open(prefix + ".md").read()
    assert "--mock-data" in report and "checks tau_std >= 0.1" in report and "| frozen | dro/scale |" in report
    with open(prefix + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
