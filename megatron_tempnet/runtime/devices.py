"""The device a run computes on: a CUDA GPU when one is present, else the CPU; and whether Transformer Engine is
there to use."""
from __future__ import annotations

import torch


def use_cuda() -> bool:
    return torch.cuda.is_available()


def transformer_engine_available() -> bool:
    """True when Transformer Engine can be imported on a CUDA machine. Never imports it on a CPU machine
    (importing it there fails, and breaks megatron-core)."""
    if not use_cuda():
        return False
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")
