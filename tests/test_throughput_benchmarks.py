"""The CPU throughput benchmarks end to end on a couple of steps: every row prints, with the figures it promises."""
import json
import os
import subprocess
import sys

import pytest
from helpers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _json_lines(script, *flags):
    # a port of its own: the one in this process's environment is held by the suite's own process group
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), "--steps", "2", "--warmup", "1",
                          *flags], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_train_throughput_rows_and_ratio():
    rows = _json_lines("train_throughput.py")
    ours = [r for r in rows if r.get("stack") == "megatron-tempnet"]
    assert [(r["tempnet"], r["loss_impl"]) for r in ours] == [
        (False, "reference"), (False, "fused"), (True, "reference"), (True, "fused")]
    assert all(r["tokens_per_s"] > 0 and r["precision"] == "float32" for r in ours)
    assert {r["tempnet_overhead"] for r in rows if "tempnet_overhead" in r} == {"reference", "fused"}
    assert any(r.get("stack") == "transformers-loop" for r in rows)
    assert next(r for r in rows if "ratio" in r)["value"] > 0


def test_tempnet_overhead_split():
    rows = _json_lines("tempnet_overhead.py")
    assert [r["row"] for r in rows if "row" in r] == ["baseline", "constant_tau", "forward_only", "tempnet"]
    split = rows[-1]["tempnet_overhead_split"]
    parts = split["carrying_a_temperature"] + split["tempnet_forward"] + split["tempnet_backward"]
    assert abs(parts - split["total"]) < 1e-3
