"""The GPU recipe's shell scripts parse, and the check script refuses an unknown part before running any."""
import subprocess
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[1] / "examples" / "gpu"


@pytest.mark.parametrize("script", sorted(p.name for p in GPU.glob("*.sh")))
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_unknown_part_refused_before_any_part_runs(tmp_path):
    out = subprocess.run(["bash", str(GPU / "run_gpu_checks.sh"), "tests", "fp4"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "refused: unknown part 'fp4'; choose from tests, loss-kernel, throughput, curves\n"
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written
