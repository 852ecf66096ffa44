"""Both sbatch scripts of examples/slurm/ under a real SLURM scheduler (tests/slurm_cluster.py), on CPU with
gloo and 2 ranks. The running job is preempted, train_srun.sbatch's by `scancel --signal=USR1`, and
train_torchrun.sbatch's by SLURM itself as the job nears its time limit (the scripts' `#SBATCH
--signal=USR1@90`); it saves, requeues itself, resumes from --load, and ends with the weights of an
uninterrupted run."""
import contextlib
import os
import re
import signal
import sys
import time

import psutil
import pytest
import torch

from slurm_cluster import LocalSlurm, unavailable

# 5 trainer launches in all; the first test also waits for the uninterrupted job. On 2 cores under a load of
# 30-45 the module took 6-13 minutes, the first test up to 7.5, close to the suite's 600 s per test.
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 40
TRAINER = ["examples/configs/tiny_gpt.yaml", "--tensor-model-parallel-size", "2", "--train-iters", str(ITERS),
           "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "1"]
# The CPU variants documented in the scripts' headers: 2 ranks on one node, no GPUs.
CPU_OPTIONS = {
    "train_srun.sbatch": ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"],
    "train_torchrun.sbatch": ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10"],
}
WARN_S = 90  # the scripts' --signal=USR1@90
PERIOD_S = 30  # slurmctld checks time limits every 30 s and warns once at most WARN_S + 30 s are left
JOB_TIMEOUT_S = 300  # for each wait; a job's whole life is under a minute on 2 idle cores


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The cluster .ci/run started (TEMPNET_SLURM_CONF), else one of our own for this module."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    conf = os.environ.get("TEMPNET_SLURM_CONF")
    if conf:
        started = LocalSlurm(os.path.dirname(conf))
        assert started.running(), f"TEMPNET_SLURM_CONF={conf}, but its daemons are not running"
        yield started
        return
    own = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    own.start()
    try:
        yield own
    finally:
        own.stop()


class Job:
    """A submitted job, its output file and polling with a clear failure message."""

    def __init__(self, cluster: LocalSlurm, script: str, folder):
        self.cluster, self.output, self.ckpt = cluster, folder / "job.out", folder / "ckpt"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC"))}
        env.update(PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""), PYTHONPATH=ROOT,
                   PYTHONUNBUFFERED="1", CKPT_DIR=str(self.ckpt))
        self.id = cluster.submit(f"examples/slurm/{script}", TRAINER,
                                 [f"--output={self.output}", f"--job-name=test-{script.split('.')[0]}",
                                  *CPU_OPTIONS[script]], env, ROOT)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        """A job that a failed check leaves running would hold the node's CPUs from the next test: cancel it."""
        try:
            if self.info().get("JobState") != "COMPLETED":
                self.cluster.command("scancel", self.id)
        except RuntimeError:
            pass

    def log(self) -> str:
        return self.output.read_text() if self.output.exists() else ""

    def info(self) -> dict:
        return self.cluster.job(self.id)

    def describe(self) -> str:
        info = self.info()
        fields = " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "Restarts", "ExitCode", "RunTime"))
        return f"job {self.id}: {fields}\n--- {self.output} (last 4000 characters) ---\n{self.log()[-4000:]}"

    def wait_for(self, what: str, predicate, timeout: float = JOB_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; {self.describe()}")
            if self.info().get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                raise AssertionError(f"the job ended while waiting for {what}; {self.describe()}")
            time.sleep(0.5)

    def run_text(self, restart: int) -> str:
        """The output of the job's run after `restart` requeues ('' until it has started)."""
        parts = re.split(r"^job \d+ \(restart (\d+)\):", self.log(), flags=re.M)
        return "".join(parts[i + 1] for i in range(1, len(parts), 2) if int(parts[i]) == restart)

    def training(self, restart: int) -> bool:
        return bool(re.search(r"^iter\s+\d+/", self.run_text(restart), flags=re.M))

    def completed(self) -> bool:
        return self.info().get("JobState") == "COMPLETED"

    def trainer_processes(self) -> list:
        """The job's trainer processes (ranks, and torchrun's agent), from the PIDs slurmd tracks for its step."""
        found = {}
        for line in self.cluster.command("scontrol", "listpids", self.id).splitlines()[1:]:
            pid, _, step = line.split()[:3]
            if step == "batch":
                continue
            try:
                top = psutil.Process(int(pid))
                for p in (top, *top.children(recursive=True)):
                    if "megatron_tempnet.train" in " ".join(p.cmdline()):
                        found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    @contextlib.contextmanager
    def frozen(self):
        """SIGSTOP the trainer processes, always SIGCONT them after: a signal sent meanwhile waits, pending (or SLURM
        continues them to deliver it), and the job is still training when it comes however fast this machine is."""
        procs = self.trainer_processes()
        assert len(procs) >= 2, f"expected 2 ranks, found {[p.cmdline() for p in procs]}; {self.describe()}"
        try:
            for p in procs:
                p.suspend()
            yield procs
        finally:
            for p in procs:
                try:
                    p.resume()
                except psutil.NoSuchProcess:  # it ended (e.g. the job was cancelled)
                    pass


def usr1_arrived(proc) -> bool:
    """SIGUSR1 reached this frozen process: it is pending, or SLURM continued the process to deliver it (its
    time-limit warning comes with a SIGCONT), or the process has ended. From /proc/PID/status."""
    try:
        text = open(f"/proc/{proc.pid}/status").read()
    except FileNotFoundError:
        return True
    status = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    pending = any(int(status[k], 16) >> (signal.SIGUSR1 - 1) & 1 for k in ("ShdPnd", "SigPnd"))
    return pending or not status["State"].startswith("T")


def iterations(text: str) -> list:
    return [int(i) for i in re.findall(r"^iter\s+(\d+)/", text, flags=re.M)]


def losses(text: str) -> dict:
    return {int(i): x for i, x in re.findall(r"^iter\s+(\d+)/\d+ \| loss ([\d.]+)", text, flags=re.M)}


def seconds(runtime: str) -> int:
    """SLURM's [D-]HH:MM:SS as seconds."""
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def final_tensors(ckpt) -> dict:
    from megatron_tempnet.checkpoint import read_checkpoint_tensors, resolve_checkpoint

    return read_checkpoint_tensors(resolve_checkpoint(ckpt))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """The same training without preemption, through train_srun.sbatch: its log and final checkpoint. A marker
    an earlier run left in the save folder is cleared when the trainer starts: it does not requeue the job."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "requeue_requested").write_text("left by an earlier run\n")
    with Job(cluster, "train_srun.sbatch", folder) as job:
        job.wait_for("the uninterrupted job to complete", job.completed)
    info, log = job.info(), job.log()
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", job.describe()
    assert iterations(log) == list(range(1, ITERS + 1)) and "requeueing" not in log, job.describe()
    assert not (job.ckpt / "requeue_requested").exists()
    return log, final_tensors(job.ckpt)


def preempt(job: Job, how: str) -> None:
    """Send the running job SIGUSR1 the way `how` says, while its trainers are frozen."""
    cluster = job.cluster
    with job.frozen() as procs:
        if how == "scancel":
            cluster.command("scancel", "--signal=USR1", job.id)
        else:  # near its time limit: shorten the limit so that WARN_S + PERIOD_S s or less are left, and
            # slurmctld itself sends the scripts' --signal=USR1@90 at its next check, with > 60 s left to save
            elapsed = seconds(job.info()["RunTime"])
            cluster.command("scontrol", "update", f"JobId={job.id}", f"TimeLimit={(elapsed + WARN_S + PERIOD_S) // 60}")
        job.wait_for(f"SIGUSR1 ({how}) to reach every trainer process",
                     lambda: all(usr1_arrived(p) for p in procs), timeout=PERIOD_S + 30)
        if how == "time limit":
            cluster.command("scontrol", "update", f"JobId={job.id}", "TimeLimit=10")  # time to finish after the requeue


@pytest.mark.parametrize("script, how", [("train_srun.sbatch", "scancel"), ("train_torchrun.sbatch", "time limit")])
def test_preempted_job_saves_requeues_resumes_and_ends_as_uninterrupted(cluster, uninterrupted, script, how, tmp_path):
    with Job(cluster, script, tmp_path) as job:
        job.wait_for("the job to train", lambda: job.training(0))
        preempt(job, how)
        job.wait_for("the job to complete after its requeue", job.completed)

    log, info = job.log(), job.info()
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", job.describe()
    stops = [int(i) for i in re.findall(r"stopping after iteration (\d+): signal SIGUSR1", log)]
    assert len(stops) == 1 and 1 <= stops[0] < ITERS and log.count("requeueing job") == 1, job.describe()
    stop = stops[0]
    assert iterations(job.run_text(0)) == list(range(1, stop + 1)), job.describe()
    resumed = job.run_text(1)  # resumed from the checkpoint it saved when it stopped
    assert f"(iteration {stop}, {stop * 8} samples consumed)" in resumed, job.describe()
    assert iterations(resumed) == list(range(stop + 1, ITERS + 1)), job.describe()
    assert not (job.ckpt / "requeue_requested").exists(), "the successful resume leaves no requeue marker"

    straight_log, straight = uninterrupted
    assert losses(log) == losses(straight_log)  # the loss curve, as printed, is the uninterrupted one
    final = final_tensors(job.ckpt)
    assert final.keys() == straight.keys()
    for key in straight:  # final weights and optimizer states identical
        assert torch.equal(final[key], straight[key]), key
