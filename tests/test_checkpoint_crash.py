"""A run killed while saving leaves the previous checkpoint loadable, and `--load` resumes from it.

The trainer runs as users start it (`python -m megatron_tempnet.train`, one CPU rank), or, to crash it, through
tests/save_hook_trainer.py: the same trainer with a save-stage hook (checkpoint.add_save_stage_hook) that stops
the save of iteration 4 at two points: after every file of the checkpoint is written into its temporary folder
(the process is then killed with SIGKILL), and after the folder is renamed but before the tracker file is
replaced (the process exits at once)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.slow

MODEL = ["--mock-data", "--vocab-size", "250", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-interval", "0",
         "--eval-iters", "1", "--tempnet-enabled", "--tempnet-hidden-size", "16", "--dro-target-entropy", "3", "--log-interval", "1",
         "--lr-warmup-iters", "1", "--train-iters", "4", "--save-interval", "2"]


def _start(save, hook=None):
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    trainer = [str(Path(__file__).with_name("save_hook_trainer.py")), hook] if hook else ["-m", "megatron_tempnet.train"]
    cmd = [sys.executable, *trainer, *MODEL, "--save", str(save), "--load", str(save)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _finish(proc, timeout=180):
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    try:  # also end helper processes a killed trainer leaves behind (they hold its output pipes)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    out, err = proc.communicate()
    if timed_out:
        pytest.fail(f"trainer did not finish in {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _losses(stdout):
    return {int(i): float(x) for i, x in re.findall(r"^iter\s+(\d+)/\d+ \| loss ([\d.]+)", stdout, flags=re.M)}


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    from megatron_tempnet.checkpoint import TRACKER_FILE, read_info, resolve_checkpoint

    save = tmp_path / "ckpt"

    # 1. killed with SIGKILL inside the save of iteration 4, all its files written, none published
    proc = _start(save, hook="pause:4:written")
    marker = save / ".test_hook_written_0"
    deadline = time.time() + 180
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            rc, out, err = _finish(proc, 5)
            pytest.fail(f"the trainer never reached the save hook (rc {rc}):\n{err[-3000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (save / TRACKER_FILE).read_text().strip() == "2"
    assert (save / ".tmp_iter_0000004" / "common.pt").is_file()  # the interrupted save's files are there
    assert not (save / "iter_0000004").exists()
    assert resolve_checkpoint(save) == save / "iter_0000002"

    # 2. resumes from iteration 2; dies after publishing the folder of iteration 4, before the tracker moves
    rc, out, err = _finish(_start(save, hook="die:4:renamed"))
    assert rc == 137, err[-3000:]
    assert "loaded checkpoint" in err and "iter_0000002" in err
    assert sorted(_losses(out)) == [3, 4]
    assert (save / "iter_0000004").is_dir() and (save / TRACKER_FILE).read_text().strip() == "2"
    assert resolve_checkpoint(save) == save / "iter_0000002"  # the tracker decides, not the folders

    # 3. a clean run resumes from iteration 2 again, republishes iteration 4, and cleans up
    rc, out3, err = _finish(_start(save))
    assert rc == 0, err[-3000:]
    assert "iter_0000002" in err.split("loaded checkpoint")[1].splitlines()[0]
    assert _losses(out3) == _losses(out)  # the same two steps as in the run that died
    assert (save / TRACKER_FILE).read_text().strip() == "4"
    assert read_info(save / "iter_0000004")["iteration"] == 4
    assert not [p.name for p in save.iterdir() if p.name.startswith((".tmp_", ".old_"))]
