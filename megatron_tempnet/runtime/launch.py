"""Where this process sits in the job: its rank, the world size and the rendezvous address.

Ranks are found from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, when
srun starts one task per rank, from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST,
SLURM_JOB_ID); a lone process is rank 0 of 1 on a free port.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'node[01-04,07]' -> 'node01', 'a,b' -> 'a'."""
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def discover_env(environ: Optional[dict] = None) -> DistEnv:
    """Rank layout from torchrun's variables, else SLURM's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = env.get("SLURM_JOB_ID", "0")
        # A port derived from the job id: jobs sharing a node do not collide, and every task agrees.
        port = 20000 + int(hashlib.sha1(job.encode()).hexdigest(), 16) % 20000
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1")),
            master_port=int(env.get("MASTER_PORT", port)),
        )
    # A lone process agrees its port with nobody: any free one, so that single-process runs can share a machine.
    return DistEnv(0, 1, 0, "127.0.0.1", int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
