"""Kill one rank of a 4-rank job at a random step, N times; count the runs that ended promptly and resumed
cleanly from the last published checkpoint. One JSON line per run and a summary line.

    python benchmarks/kill_resume.py --runs 10

Each run: torchrun, 4 CPU ranks (TP=2 x DP=2), tiny GPT with TempNet, a checkpoint every 2 steps; after a
random number of logged steps, SIGKILL to a random rank; the job must end within --timeout seconds; then a
new run with --load must find the last published checkpoint and train one more step.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from launch import finish, kill_sessions, sessions_of, torchrun, wait_for_line  # noqa: E402

ARGS = ["--config", "examples/configs/tiny_gpt.yaml", "--num-layers", "4", "--hidden-size", "32", "--seq-length", "32",
        "--eval-interval", "0", "--log-interval", "1", "--tensor-model-parallel-size", "2"]


def one_run(rng: random.Random, timeout: float) -> dict:
    import psutil

    save = tempfile.mkdtemp(prefix="kill_resume_")
    try:
        proc = torchrun([*ARGS, "--train-iters", "200", "--save", save, "--save-interval", "2",
                         "--distributed-timeout-minutes", "1"])
        kill_at, victim_rank = rng.randint(3, 12), rng.randrange(4)
        seen = []
        if not wait_for_line(proc, f"iter {kill_at:6d}/", timeout=600, lines=seen):
            kill_sessions(sessions_of(proc.pid) | {proc.pid})
            return {"ok": False, "why": "job did not reach the kill step", "tail": "".join(seen)[-500:]}
        workers = sorted(psutil.Process(proc.pid).children(), key=lambda p: p.pid)
        sessions = sessions_of(proc.pid) | {proc.pid}
        t0 = time.monotonic()
        workers[victim_rank].send_signal(signal.SIGKILL)
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            time.sleep(0.2)
        ended_s = time.monotonic() - t0
        kill_sessions(sessions)
        _, out = finish([proc], timeout=10)[0]
        named = bool(re.search(rf"rank\s*:\s*{victim_rank} ", out))
        tracker = os.path.join(save, "latest_checkpointed_iteration.txt")
        last = int(open(tracker).read()) if os.path.exists(tracker) else 0
        code, resumed = finish([torchrun([*ARGS, "--train-iters", str(last + 1), "--save", save, "--load", save])],
                               timeout=600)[0]
        resumed_ok = code == 0 and f"iter {last + 1:6d}/" in resumed
        return {"ok": ended_s < timeout and named and resumed_ok, "kill_at": kill_at, "victim_rank": victim_rank,
                "ended_s": round(ended_s, 2), "dead_rank_named": named, "last_checkpoint": last, "resumed": resumed_ok}
    finally:
        shutil.rmtree(save, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the job may take to end after the kill")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    ok = 0
    for i in range(args.runs):
        r = one_run(rng, args.timeout)
        ok += r["ok"]
        print(json.dumps({"run": i + 1, **r}), flush=True)
    print(json.dumps({"runs": args.runs, "resumed_cleanly": ok}))


if __name__ == "__main__":
    main()
