"""The quickstart as a new user runs it, shortened: every step runs, the sample lists each token's temperature
with the sample's spread, and the shaded picture opens."""
import os
import re
import subprocess

import pytest

from helpers import free_port

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_trains_tempnet_and_writes_the_shaded_sample(tmp_path):
    from PIL import Image

    out = tmp_path / "qs"
    env = dict(os.environ, QUICKSTART_DIR=str(out), QUICKSTART_ITERS="6", QUICKSTART_TEMPNET_ITERS="6",
               MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", "examples/quickstart.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "validation perplexity of the LM" in proc.stdout
    assert re.search(r"TempNet's per-token tau std on validation tokens: [\d.]+ \(iter 0\) -> [\d.]+ \(iter 6\)",
                     proc.stdout)
    taus = re.findall(r"^\s+\d+\s+\d+\s+([\d.]+)\s+'", proc.stdout, re.M)
    summary = re.search(r"tau over (\d+) generated tokens: mean ([\d.]+), std ([\d.]+)", proc.stdout)
    assert summary and int(summary.group(1)) == len(taus) > 0
    with Image.open(out / "sample.png") as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 20
    html = (out / "sample.html").read_text()
    assert html.count('data-tau="') > len(taus)  # the prompt's tokens too
