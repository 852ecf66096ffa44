"""The trainer as users start it: torchrun with 4 CPU ranks, tiny GPT and LLaMA configs, and the loss falls."""
import os
import re
import signal
import subprocess
import sys

import pytest

from helpers import free_port

pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2_pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "tp2_dp2": ["--tensor-model-parallel-size", "2"],
    "pp2_dp2": ["--pipeline-model-parallel-size", "2"],
}


def run_trainer(nproc: int, args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           "-m", "megatron_tempnet.train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
        out, err = proc.communicate()
        pytest.fail(f"trainer did not finish in {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def losses(stdout: str) -> list:
    return [float(x) for x in re.findall(r"^iter\s+\d+/\d+ \| loss ([\d.]+)", stdout, flags=re.M)]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_four_ranks_train_and_loss_falls(arch, layout, tmp_path):
    proc = run_trainer(4, ["--config", f"examples/configs/tiny_{arch}.yaml", *LAYOUTS[layout],
                           "--train-iters", "30", "--log-interval", "5", "--eval-interval", "0",
                           "--tensorboard-dir", str(tmp_path / "tb"), "--tau-histogram-interval", "10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(proc.stdout)
    assert len(curve) == 6, proc.stdout
    assert curve[-1] < curve[0] - 0.1, curve
    assert "ppl (tau=1)" in proc.stdout
    check_tau_histograms(tmp_path / "tb", arch, dp_size=2 if "dp2" in layout else 1)
    check_tau_diagnostics(tmp_path / "tb", step=30)


def check_tau_diagnostics(tb_dir, step: int) -> None:
    """The final evaluation's per-token tau diagnostics, gathered over the data-parallel ranks, are logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}).Reload()
    for key in ("tau_std", "tau_p5", "tau_p50", "tau_p95", "frac_at_min", "frac_at_max", "tau_opt_mean",
                "spearman_tau_opt", "spearman_tau_entropy", "logit_scale"):
        values = events.Scalars(f"valid/{key}")
        assert [v.step for v in values] == [step], key
    p5, p50, p95 = (events.Scalars(f"valid/tau_p{q}")[0].value for q in (5, 50, 95))
    assert p5 <= p50 <= p95
    assert 0 <= events.Scalars("valid/frac_at_min")[0].value <= 1


def check_tau_histograms(tb_dir, arch: str, dp_size: int) -> None:
    """The logging rank's TensorBoard file holds a tau histogram every 10 steps: one value per token of its
    data-parallel share of the global batch (mock data masks no token), all inside the config's tau bounds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"histograms": 0}).Reload()
    histograms = events.Histograms("tau/histogram")
    assert [h.step for h in histograms] == [10, 20, 30]
    tau_min, tau_max = {"gpt": (0.5, 5.0), "llama": (0.01, 2.0)}[arch]
    for h in histograms:
        assert h.histogram_value.num == 8 * 64 // dp_size  # global batch 8 x sequence 64
        assert tau_min <= h.histogram_value.min <= h.histogram_value.max <= tau_max
