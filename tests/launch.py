"""Start the trainer as a cluster would: SLURM-style tasks (one process per rank, SLURM_* variables only),
or torchrun. Processes get their own session so a test can signal or kill them, and never outlive it."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    return env


def slurm_tasks(args: list, ntasks: int = 4, tasks_per_node: int = 2, job_id: str | None = None) -> list:
    """One trainer process per rank with the variables srun sets (as if `ntasks / tasks_per_node` nodes)."""
    job_id = job_id or str(free_port())  # the trainer derives its port from the job id
    procs = []
    for rank in range(ntasks):
        env = _base_env()
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(rank % tasks_per_node),
                   SLURM_NODEID=str(rank // tasks_per_node), SLURM_NODELIST="localhost", SLURM_JOB_ID=job_id)
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_tempnet.train", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def torchrun(args: list, nproc: int = 4, extra: list | None = None, env_extra: dict | None = None) -> subprocess.Popen:
    env = _base_env()
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *(extra or []),
           "-m", "megatron_tempnet.train", *args]
    if not extra:
        cmd[5:5] = ["--master_port", str(free_port())]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float, lines: list) -> bool:
    """Read proc's output into `lines` until a line contains `needle` (True) or the process ends / times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        lines.append(line)
        if needle in line:
            return True
    return False


def sessions_of(pid: int) -> set:
    """Session ids of a process and its descendants (torchrun starts each worker in a session of its own)."""
    import psutil

    found = set()
    try:
        for q in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            found.add(os.getsid(q.pid))
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass
    return found


def kill_sessions(sessions: set) -> None:
    """SIGKILL every process in these sessions: also helper processes a worker started (megatron-core's
    checkpoint writers), which outlive a killed worker as orphans that still hold the output pipe."""
    import psutil

    for q in psutil.process_iter():
        try:
            if q.pid != os.getpid() and os.getsid(q.pid) in sessions:
                q.kill()
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass


def finish(procs: list, timeout: float) -> list:
    """Wait for every process (killing the whole group after `timeout`); returns [(returncode, output)]."""
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            kill_sessions(sessions_of(p.pid) | {p.pid})
            text, _ = p.communicate()
            p.returncode = "timeout"
        out.append((p.returncode, text))
    return out
