"""Small pieces the benchmark scripts share: the commit a result was made at, the pool of fresh single-rank worker
processes and the body of one (benchmarks that train several runs side by side start one per run), and the training
and held-out tokens of the benchmarks that train small models (tempnet_ablation.py, tempnet_recipe.py,
attention_transfer.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable, Iterator, List, Tuple

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

    from megatron_tempnet import runtime

    warnings.filterwarnings("ignore")
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    port = runtime.free_port()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        row = run(spec)
    finally:
        runtime.destroy_distributed()
    with open(out_path + ".tmp", "w") as f:
        json.dump(row, f)
    os.replace(out_path + ".tmp", out_path)
    return 0


def run_workers(script: str, specs: List[dict], jobs: int, log_dir: str, tag: str) -> Iterator[Tuple[dict, dict, float]]:
    """Run each spec in a fresh process, `python script --worker SPEC OUT` (which calls single_rank_worker),
    `jobs` at a time; yield (spec, its JSON result, wall seconds) as each finishes. spec["name"] names its log,
    log_dir/NAME.log. A run that fails ends the benchmark (SystemExit) with the end of its log."""
    os.makedirs(log_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pending, active = list(specs), []
        while pending or active:
            while pending and len(active) < max(jobs, 1):
                spec = pending.pop(0)
                spec_path, out_path = os.path.join(tmp, spec["name"] + ".json"), os.path.join(tmp, spec["name"] + ".out")
                with open(spec_path, "w") as f:
                    json.dump(spec, f)
                log_path = os.path.join(log_dir, spec["name"] + ".log")
                log = open(log_path, "w")
                proc = subprocess.Popen([sys.executable, os.path.abspath(script), "--worker", spec_path, out_path],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
                print(f"[{tag}] started {spec['name']} (log {log_path})", file=sys.stderr, flush=True)
                active.append((proc, log, spec, out_path, log_path, time.perf_counter()))
            time.sleep(1.0)
            for entry in list(active):
                proc, log, spec, out_path, log_path, started = entry
                if proc.poll() is None:
                    continue
                active.remove(entry)
                log.close()
                if proc.returncode != 0 or not os.path.isfile(out_path):
                    with open(log_path) as f:
                        raise SystemExit(f"[{tag}] {spec['name']} failed (exit {proc.returncode}):\n{f.read()[-3000:]}")
                with open(out_path) as f:
                    yield spec, json.load(f), time.perf_counter() - started


def heldout_windows(data: dict, seq_length: int, vocab_size: int):
    """All held-out tokens (documents in order, EOD-separated, as preprocessed) cut into consecutive,
    non-overlapping windows of seq_length + 1 tokens: [n, seq_length + 1] int64. The same for every run.
    data: {"mock": True} or {"heldout": [dataset prefixes]}."""
    import numpy as np
    import torch

    if data.get("mock"):
        from megatron_tempnet.training.batches import MockTokens

        ds = MockTokens(vocab_size, seq_length, 64, seed=987654)  # a fixed seed no training run uses
        return torch.stack([torch.cat([ds[i]["tokens"], ds[i]["labels"][-1:]]) for i in range(len(ds))]).long()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    parts = []
    for prefix in data["heldout"]:
        ds = IndexedDataset(prefix)
        parts.extend(np.asarray(ds[i], dtype=np.int64) for i in range(len(ds)))
    tokens = torch.from_numpy(np.concatenate(parts))
    n = (tokens.numel() - 1) // seq_length
    idx = torch.arange(n).unsqueeze(1) * seq_length + torch.arange(seq_length + 1).unsqueeze(0)
    return tokens[idx]


def spread_subset(windows, count: int):
    """`count` windows spread evenly over all of them (0 or more than there are: all)."""
    n = windows.size(0)
    if count <= 0 or count >= n:
        return windows
    return windows[[int(i * n / count) for i in range(count)]]


def train_dataset(cfg, shuffle_seed: int):
    """The run's training samples (train_iters x global_batch_size of them): mock tokens seeded by the run's
    seed, or the config's preprocessed data in the order `shuffle_seed` gives."""
    from megatron_tempnet.training.batches import MockTokens

    t, m = cfg.train, cfg.model
    n = t.train_iters * t.global_batch_size
    if cfg.data.mock_data:
        return MockTokens(m.vocab_size, m.seq_length, n, seed=t.seed)
    from megatron_tempnet.data.datasets import build_gpt_datasets
    from megatron_tempnet.data.tokenizer import load_tokenizer

    train, _, _ = build_gpt_datasets(cfg.data.data_path, cfg.data.split, m.seq_length, shuffle_seed,
                                     load_tokenizer(cfg.data.tokenizer_model), (n, 0, 0), cfg.data.data_cache_path,
                                     create_attention_mask=False)
    return train
