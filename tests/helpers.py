"""Test helpers: run a function on N ranks of a real gloo process group, and tiny configurations."""
from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megatron_tempnet.runtime import free_port


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    warnings.filterwarnings("ignore")
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # report the failure to the parent with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        from megatron_tempnet import runtime

        runtime.destroy_distributed()


def spawn(fn: Callable, world_size: int, *args: Any) -> list:
    """Run fn(*args) on `world_size` fresh processes that form a gloo group; return each rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
                               start_method="spawn", join=True)
        except Exception:
            pass  # the per-rank files below carry the reason
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} died without a result")
            r = torch.load(path, weights_only=False)
            if not r["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{r['error']}")
            results.append(r["result"])
        return results


def tiny_config(arch: str = "gpt", tempnet: bool = True, **overrides):
    """A small model that trains in a second per step on one CPU core."""
    from megatron_tempnet.config import Config

    cfg = Config()
    cfg.model.arch = arch
    cfg.model.num_layers = 4
    cfg.model.hidden_size = 32
    cfg.model.num_attention_heads = 4
    cfg.model.num_query_groups = 2 if arch == "llama" else None
    cfg.model.seq_length = 16
    cfg.model.vocab_size = 250  # padded to 256: padding entries are exercised
    cfg.train.micro_batch_size = 2
    cfg.train.global_batch_size = 8
    cfg.train.train_iters = 3
    cfg.train.lr = 1e-2
    cfg.train.lr_warmup_iters = 1
    cfg.train.eval_interval = 0
    cfg.train.eval_iters = 1
    cfg.data.mock_data = True
    cfg.tempnet.enabled = tempnet
    cfg.tempnet.hidden_size = 16
    cfg.tempnet.lr = 1e-2
    cfg.loss.dro_target_entropy = 3.0 if tempnet else None  # reachable at V = 250 (log V = 5.5)
    # the reference's initialisation: tau varies between tokens from step 0, so plumbing tests compare real values
    cfg.tempnet.tau_init = None
    cfg.logging.log_interval = 1000
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def assert_same_hf_folders(a, b, must_hold) -> None:
    """Two Hugging Face folders with identical tensors (among them one whose key satisfies `must_hold`, so the
    comparison covers what the caller cares about), config.json and generation_config.json."""
    import json

    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and any(must_hold(k) for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for name in ("config.json", "generation_config.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
