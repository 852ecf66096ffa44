"""SLURM's stop signals reaching the trainer before its first step (without a scheduler: SLURM-style tasks)."""
import os
import re
import signal
import time

import psutil
import pytest

from helpers import free_port
from launch import finish, slurm_tasks
from megatron_tempnet.runtime import discover_env

pytestmark = pytest.mark.slow

TINY = ["--config", "examples/configs/tiny_gpt.yaml", "--num-layers", "2", "--hidden-size", "32",
        "--seq-length", "32", "--eval-interval", "0", "--eval-iters", "1", "--log-interval", "1"]


def test_stop_signal_during_setup_stops_after_the_first_step_and_requeues(tmp_path):
    """A SIGUSR1 that comes while the ranks set up (here: once rank 0 listens for the process group, before the
    model is built) is kept, not fatal (its default action): the run takes one step, saves it and asks to be
    requeued."""
    save, job_id = str(tmp_path / "ckpt"), str(free_port())
    port = discover_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": job_id}).master_port
    procs = slurm_tasks([*TINY, "--train-iters", "6", "--tensor-model-parallel-size", "2", "--save", save,
                         "--load", save], ntasks=2, job_id=job_id)
    deadline = time.monotonic() + 240
    while not any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.net_connections("tcp")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs, 10)[0][1][-3000:]
        time.sleep(0.05)
    for p in procs:  # SLURM signals every task
        os.kill(p.pid, signal.SIGUSR1)
    results = finish(procs, timeout=240)
    log = "".join(text for _, text in results)
    assert [code for code, _ in results] == [124, 124], log[-3000:]
    assert re.search(r"stopping after iteration 1: signal SIGUSR1", log), log[-3000:]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "1"
    assert open(os.path.join(save, "requeue_requested")).read() == "signal SIGUSR1 at iteration 1\n"
