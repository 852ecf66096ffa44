"""Cluster behaviour: SLURM-style launches, preemption (SIGUSR1) with an exact resume, a killed rank, a
stalled collective, and non-finite steps."""
import os
import re
import signal
import time

import pytest
import torch

from helpers import free_port, spawn, tiny_config
from launch import finish, kill_sessions, sessions_of, slurm_tasks, torchrun, wait_for_line

pytestmark = pytest.mark.slow

TINY = ["--config", "examples/configs/tiny_gpt.yaml", "--num-layers", "4", "--hidden-size", "32",
        "--seq-length", "32", "--eval-interval", "0", "--eval-iters", "1", "--log-interval", "1"]


KILL_TIMEOUT_S = 120  # generous: CI machines may be busy; the job usually ends within seconds


def losses(text: str) -> dict:
    return {int(i): float(x) for i, x in re.findall(r"^iter\s+(\d+)/\d+ \| loss ([\d.]+)", text, flags=re.M)}


def test_slurm_tasks_train_without_hand_set_variables():
    """2 'nodes' x 2 tasks as 4 local processes, each with only SLURM's variables."""
    procs = slurm_tasks([*TINY, "--train-iters", "6", "--tensor-model-parallel-size", "2"])
    results = finish(procs, timeout=240)
    assert all(code == 0 for code, _ in results), results[-1][1][-3000:]
    curve = losses(results[-1][1])  # the last rank logs
    assert sorted(curve) == list(range(1, 7)) and curve[6] < curve[1]


def test_srun_plus_torchrun_style():
    """One launcher per 'node' (torchrun with c10d rendezvous), two ranks each."""
    port = free_port()
    extra = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "job42"]
    slurm = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "2", "SLURM_NODELIST": "localhost"}
    nodes = [torchrun([*TINY, "--train-iters", "4", "--pipeline-model-parallel-size", "2"], nproc=2, extra=extra,
                      env_extra={**slurm, "SLURM_PROCID": str(i)}) for i in range(2)]
    results = finish(nodes, timeout=240)
    assert all(code == 0 for code, _ in results), "\n".join(t[-2000:] for _, t in results)
    assert any(len(losses(t)) == 4 for _, t in results)


def test_preemption_saves_exits_for_requeue_and_resumes_exactly(tmp_path):
    args = [*TINY, "--train-iters", "14", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    straight = losses(finish(slurm_tasks(args), timeout=300)[-1][1])
    assert sorted(straight) == list(range(1, 15))

    save = str(tmp_path / "ckpt")
    procs = slurm_tasks([*args, "--save", save, "--load", save])
    seen = []
    assert wait_for_line(procs[-1], "iter      3/", timeout=240, lines=seen), "".join(seen)[-3000:]
    os.kill(procs[1].pid, signal.SIGUSR1)  # one rank gets it; all must stop after the same step
    results = finish(procs, timeout=240)
    codes = [code for code, _ in results]
    assert codes == [124] * 4, codes
    log = "".join(seen) + results[-1][1]
    stopped_at = int(re.search(r"stopping after iteration (\d+): signal SIGUSR1", log).group(1))
    assert 3 <= stopped_at < 14
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == str(stopped_at)
    assert os.path.exists(os.path.join(save, "requeue_requested"))

    resumed = finish(slurm_tasks([*args, "--save", save, "--load", save]), timeout=300)
    assert [c for c, _ in resumed] == [0] * 4, resumed[-1][1][-3000:]
    after = losses(resumed[-1][1])
    assert sorted(after) == list(range(stopped_at + 1, 15))
    for i in after:
        assert after[i] == straight[i], (i, after[i], straight[i])  # printed to 4 decimals: the same curve


def test_killed_rank_ends_the_job_and_last_checkpoint_loads(tmp_path):
    save = str(tmp_path / "ckpt")
    args = [*TINY, "--train-iters", "40", "--tensor-model-parallel-size", "2", "--save", save, "--save-interval", "2",
            "--distributed-timeout-minutes", "0.5"]
    proc = torchrun(args)
    seen = []
    assert wait_for_line(proc, "iter      5/", timeout=240, lines=seen), "".join(seen)[-3000:]
    import psutil

    workers = sorted(psutil.Process(proc.pid).children(), key=lambda p: p.pid)
    victim = workers[2]
    sessions = sessions_of(proc.pid) | {proc.pid}
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:  # torchrun notices and stops the others
        time.sleep(0.5)
    ended_s = time.monotonic() - t0
    kill_sessions(sessions)  # orphans of the killed rank (see launch.kill_sessions) hold the output pipe
    (code, out), = finish([proc], timeout=10)
    assert code not in (0, "timeout") and ended_s < KILL_TIMEOUT_S, (code, ended_s)
    assert code not in (0, "timeout") and time.monotonic() - t0 < KILL_TIMEOUT_S
    log = "".join(seen) + out
    assert re.search(r"rank\s*:\s*2 ", log) or "rank2" in log, log[-3000:]  # torchrun names the dead rank
    # the last published checkpoint loads and training continues from it
    from megatron_tempnet.checkpoint import resolve_checkpoint

    last = resolve_checkpoint(save)
    it = int(last.name.split("_")[1])
    resumed = finish([torchrun([*args[:-4], "--load", save, "--train-iters", str(it + 1)])], timeout=240)
    assert resumed[0][0] == 0, resumed[0][1][-3000:]
    assert sorted(losses(resumed[0][1])) == [it + 1]


def _stall_one_rank(cfg):
    import torch.distributed as dist

    from megatron_tempnet.training import loop

    original, calls = loop.train_step, []

    def train_step(*a, **k):
        if dist.get_rank() == 1 and len(calls) == 2:
            time.sleep(25)  # rank 1 stops answering in its third step
        calls.append(1)
        return original(*a, **k)

    loop.train_step = train_step
    state = loop.RunState()
    t0 = time.monotonic()
    try:
        loop.train(cfg, state)
        return {"rank": dist.get_rank(), "phase": state.phase, "error": None}
    except Exception as err:  # what train.py's main turns into its message
        from megatron_tempnet.train import _is_collective_failure

        return {"rank": dist.get_rank(), "phase": state.phase, "error": str(err)[:500],
                "collective": _is_collective_failure(err), "seconds": time.monotonic() - t0}


def test_stalled_collective_times_out_naming_phase_and_operation():
    cfg = tiny_config("gpt", train__train_iters=6, parallel__distributed_timeout_minutes=0.1)  # 6 s
    waiting = spawn(_stall_one_rank, 2, cfg)[0]  # rank 0 waits for the stalled rank 1
    assert waiting["error"] is not None and waiting["collective"], waiting
    assert waiting["phase"] == "training step 3", waiting
    assert "Timed out" in waiting["error"] or "timed out" in waiting["error"], waiting


def _nonfinite_run(cfg, bad_steps):
    from megatron_tempnet.training import loop, step
    from megatron_tempnet.checkpoint import read_checkpoint_tensors, resolve_checkpoint

    original = step.loss_func
    count = {"calls": 0}
    microbatches = cfg.train.global_batch_size // cfg.train.micro_batch_size // int(os.environ["WORLD_SIZE"])

    def loss_func(mask, output):
        loss, n, report = original(mask, output)
        iteration = count["calls"] // microbatches + 1
        count["calls"] += 1
        if iteration in bad_steps:
            loss.register_hook(lambda g: g * float("nan"))  # non-finite gradients, finite loss
        return loss, n, report

    step.loss_func = loss_func
    state = loop.RunState()
    try:
        loop.train(cfg, state)
        error = None
    except loop.TrainingError as err:
        error = str(err)
    tensors = read_checkpoint_tensors(resolve_checkpoint(cfg.checkpoint.save)) if cfg.checkpoint.save else {}
    return {"skipped": state.skipped_steps, "history": [h.get("update_successful") for h in state.history if "loss" in h],
            "error": error, "finite": all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()),
            "n_tensors": len(tensors)}


def test_nonfinite_gradients_are_skipped_counted_and_never_checkpointed(tmp_path):
    cfg = tiny_config("gpt", train__train_iters=6, checkpoint__save=str(tmp_path / "c"), checkpoint__save_interval=3)
    r = spawn(_nonfinite_run, 2, cfg, {3})[0]
    assert r["skipped"] == 1 and r["history"] == [True, True, False, True, True, True]
    assert r["error"] is None and r["n_tensors"] > 0 and r["finite"]


def test_too_many_nonfinite_steps_in_a_row_abort(tmp_path):
    cfg = tiny_config("gpt", train__train_iters=10, train__max_nonfinite_steps=3, checkpoint__save=str(tmp_path / "c"),
                      checkpoint__save_interval=2)
    r = spawn(_nonfinite_run, 1, cfg, {3, 4, 5, 6, 7})[0]
    assert "3 steps in a row" in r["error"] and "--max-nonfinite-steps" in r["error"]
    assert r["finite"]
