"""A real single-node SLURM cluster on this machine for the `slurm` tests: munged, slurmctld and slurmd with
their configuration, sockets, state and logs in one folder, on free ports, stopped by the PIDs they wrote.

    python tests/slurm_cluster.py start DIR     # prints `export TEMPNET_SLURM_CONF=DIR/slurm.conf`
    python tests/slurm_cluster.py stop DIR

Needs Debian's `slurm-wlm` and `munge` packages (`apt-get install -y slurm-wlm munge`) and root (slurmd starts
every job's processes). `unavailable()` says why a machine cannot run it, for the tests' skip reason.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
START_TIMEOUT_S = 30
REQUEUE_DELAY_S = 5  # cred_expire: also how long a requeued job waits before it may start again (default 120 s)


def unavailable() -> Optional[str]:
    """None when this machine can run a test cluster, else the reason (for a skip)."""
    reason = os.environ.get("TEMPNET_SLURM_UNAVAILABLE")  # set by .ci/run when the packages could not be installed
    if reason:
        return reason
    missing = [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not found): apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts the jobs' processes)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: Optional[int]) -> bool:
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a daemon that exited but was not reaped yet counts as stopped


class LocalSlurm:
    """One node named after this host (`hostname -s`), `cpus` CPUs, one default partition that requeues."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict:
        """The environment for client commands (sbatch, squeue, ...) and the jobs they submit."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *args: str, env: Optional[dict] = None) -> str:
        """Run a client command (sbatch, scontrol, scancel, ...) in `env` (default: ours) on this cluster; its
        stdout, or RuntimeError with its stderr."""
        done = subprocess.run(args, env={**(env or os.environ), "SLURM_CONF": str(self.conf)}, capture_output=True,
                              text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed (status {done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def submit(self, script: str, args: list, options: list, env: dict, cwd: str) -> str:
        """sbatch OPTIONS SCRIPT ARGS from `cwd`, the job getting the environment `env`; returns the job id."""
        out = self.command("sbatch", "--parsable", f"--chdir={cwd}", *options, script, *args, env=env)
        return out.split(";")[0].strip()  # "ID" or "ID;CLUSTER"

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict of its fields (JobState, Restarts, ExitCode, RunTime, ...)."""
        return dict(re.findall(r"(\w[\w/:]*)=(\S*)", self.command("scontrol", "show", "job", "-o", job_id)))

    def _pidfile(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def _write_config(self, cpus: int) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("munge", "run", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=tempnet-test",
            # The trainer and train_torchrun.sbatch derive their ports from the job id: clusters started side by
            # side (two test runs on one machine) must not hand out the same ids.
            f"FirstJobId={random.randrange(1000, 1_000_000)}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={REQUEUE_DELAY_S}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",  # a requeued job starts as soon as cred_expire allows
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` (there is no accounting here)
            "SlurmdParameters=config_overrides",  # the node's CPUs as written here, whatever the machine has
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={self._pidfile('slurmctld')}",
            f"SlurmdPidFile={self._pidfile('slurmd')}",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def start(self, cpus: Optional[int] = None) -> None:
        """Write the configuration and start the three daemons; returns once the node takes jobs. The node has
        this machine's CPUs (at least 2: a test job asks for 2, and more than the cores only oversubscribes)."""
        if self.running():
            return
        self._write_config(cpus or max(2, os.cpu_count() or 1))
        m = self.root / "munge"
        self._run(["munged", "--force", f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                   f"--pid-file={self._pidfile('munged')}", f"--log-file={self.root}/log/munged.log",
                   f"--seed-file={m}/munged.seed"], "munged")
        self._run(["slurmctld", "-f", str(self.conf)], "slurmctld")
        self._run(["slurmd", "-f", str(self.conf)], "slurmd")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the SLURM node did not become idle within {START_TIMEOUT_S} s; see {self.root}/log/")

    def _run(self, cmd: list, daemon: str) -> None:
        """Start a daemon (each forks into the background) and wait for its pid file."""
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while done.returncode == 0 and time.monotonic() < deadline:
            if _alive(_pid(self._pidfile(daemon))):
                return
            time.sleep(0.2)
        log = self.root / "log" / f"{daemon}.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        self.stop()
        raise RuntimeError(f"{daemon} did not start (status {done.returncode}): {done.stderr.strip()}\n{tail}")

    def running(self) -> bool:
        return all(_alive(_pid(self._pidfile(d))) for d in DAEMONS)

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged by their PIDs (SIGKILL after `timeout`)."""
        if _alive(_pid(self._pidfile("slurmctld"))):
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "-h", "-t", "running,completing"], env=self.env, capture_output=True,
                    text=True).stdout.strip():
                time.sleep(0.5)
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid = _pid(self._pidfile(daemon))
            if not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def main(argv: list) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_cluster.py start|stop DIR", file=sys.stderr)
        return 2
    cluster = LocalSlurm(argv[1])
    if argv[0] == "stop":
        cluster.stop()
        return 0
    reason = unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    cluster.start()
    print(f"export TEMPNET_SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
