"""Small pieces the benchmark scripts share: the commit a result was made at, and the body of a fresh
single-rank worker process (benchmarks that train several runs side by side start one per run)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import warnings
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """Short hash of the checkout's HEAD, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def single_rank_worker(spec_path: str, out_path: str, run: Callable[[dict], dict]) -> int:
    """Body of a fresh process for one run: read the JSON spec, set its torch threads, form a 1-rank gloo
    group on a free port, call run(spec) and write its JSON row atomically (out_path appears only when done)."""
    import torch

    from megatron_tempnet import platform

    warnings.filterwarnings("ignore")
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        row = run(spec)
    finally:
        platform.destroy_distributed()
    with open(out_path + ".tmp", "w") as f:
        json.dump(row, f)
    os.replace(out_path + ".tmp", out_path)
    return 0
