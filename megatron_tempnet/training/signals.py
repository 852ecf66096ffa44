"""When to stop a run early, decided identically on every rank.

- SIGTERM (sent by SLURM at preemption or `scancel`, and by torchrun when another rank died) and SIGUSR1
  (SLURM's warning before the time limit, `#SBATCH --signal=USR1@90`): finish the step, save, exit with
  REQUEUE_EXIT_CODE so the batch script requeues the job;
- SIGINT (Ctrl-C): the same, but exit with status 130 (interrupted, no requeue). A second Ctrl-C, more than
  INTERRUPT_REPEAT_S after the first, stops at once without saving (KeyboardInterrupt). torchrun starts each
  worker in a session of its own and forwards one SIGINT to it, then kills it after its --shutdown-timeout
  (30 s by default): a save that takes longer needs a larger --shutdown-timeout. A second Ctrl-C to torchrun
  makes torchrun stop waiting and kill its workers at once (torchrun's rule);
- --exit-duration-in-mins: the same as SIGTERM, once the run has been going that long (a job's time limit);
- --exit-interval: save and exit normally at a multiple of that iteration.

A signal reaches each rank at a slightly different moment, so the flags are combined with one small
all-reduce (MAX) after every step: all ranks stop after the same step, and their checkpoint is consistent.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 124  # what the sbatch scripts in examples/slurm/ requeue on
REQUEUE_MARKER = "requeue_requested"  # also written into --save, for launchers that hide exit statuses
INTERRUPTED_EXIT_CODE = 130  # the shell's status for a Ctrl-C
INTERRUPT_REPEAT_S = 2.0  # a second SIGINT sooner than this is the same Ctrl-C delivered twice (a launcher's copy)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# the scheduler's stop signals kept while the run sets up (a Ctrl-C then still stops the process at once)
EARLY_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_before_run: list = []  # stop signals that came before StopConditions was set up


def keep_early_stop_signals() -> None:
    """First thing in a trainer process: a stop signal that comes while the run sets up (process groups, model,
    checkpoint load: minutes at scale) is kept for StopConditions, which stops after the first step, instead of
    killing the rank with no checkpoint and no requeue (the default action of both signals)."""
    for sig in EARLY_STOP_SIGNALS:
        try:
            signal.signal(sig, lambda signum, _frame: _before_run.append(signum))
        except ValueError:  # not the main thread: signals cannot be handled here
            pass


def leave_requeue_marker(save_dir: str, why: str) -> None:
    """After the checkpoint: rank 0 writes the marker that asks the batch script to requeue the job, and no rank
    goes on to exit before it is written (srun --kill-on-bad-exit ends every task once the first one exits)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(save_dir, REQUEUE_MARKER), "w") as f:
            f.write(why + "\n")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def clear_requeue_marker(save_dir: Optional[str]) -> None:
    """Remove the marker an earlier run left in `save_dir`: it asks for one requeue, which this run serves, so
    a stale marker never requeues a later job that fails for another reason."""
    if save_dir:
        try:
            os.remove(os.path.join(save_dir, REQUEUE_MARKER))
        except FileNotFoundError:
            pass


class StopConditions:
    def __init__(self, exit_duration_in_mins: Optional[float] = None, exit_interval: Optional[int] = None):
        self.exit_duration_s = None if exit_duration_in_mins is None else 60.0 * exit_duration_in_mins
        self.exit_interval = exit_interval
        self.started = time.monotonic()
        self.received: Optional[int] = _before_run[-1] if _before_run else None
        _before_run.clear()
        self._interrupted_at: Optional[float] = None
        self._previous = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None and now - self._interrupted_at > INTERRUPT_REPEAT_S:
                raise KeyboardInterrupt
            if self._interrupted_at is None and (not dist.is_initialized() or dist.get_rank() == 0):
                print("interrupted: finishing this step, then saving (if --save) and stopping; press Ctrl-C again "
                      "to stop at once without saving", flush=True)
            self._interrupted_at = self._interrupted_at or now
        self.received = max(self.received or 0, int(signum))

    def check(self, iteration: int) -> Optional[str]:
        """After a step: None to go on, else why to stop ("signal SIGUSR1", "exit duration", "exit interval")."""
        flags = torch.tensor([
            float(self.received or 0),
            float(self.exit_duration_s is not None and time.monotonic() - self.started >= self.exit_duration_s),
        ])
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            flags = flags.to(device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.cpu()
        if flags[0] > 0:
            return f"signal {signal.Signals(int(flags[0])).name}"
        if flags[1] > 0:
            return "exit duration"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return "exit interval"
        return None

    @staticmethod
    def exit_code(reason: Optional[str]) -> int:
        """REQUEUE_EXIT_CODE when the run should continue in a requeued job, INTERRUPTED_EXIT_CODE after a
        Ctrl-C, else 0."""
        if reason == f"signal {signal.SIGINT.name}":
            return INTERRUPTED_EXIT_CODE
        return REQUEUE_EXIT_CODE if reason and reason != "exit interval" else 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
