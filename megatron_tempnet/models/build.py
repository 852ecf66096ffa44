"""Build this rank's model chunks from a Config, without DDP or anything else of training.

Used by training (training/model_setup.py wraps the chunks in megatron-core DDP), inference, hf and adaptive.
"""
from __future__ import annotations

from typing import List

import torch
from megatron.core import parallel_state

from .. import runtime
from ..config import Config
from .language_model import TempNetGPTModel, transformer_config


def params_dtype(cfg: Config) -> torch.dtype:
    """The LM's parameter dtype: --precision, "auto" being bf16 on a GPU and fp32 on a CPU."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if runtime.use_cuda() else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def use_transformer_engine(cfg: Config) -> bool:
    """Whether the layers are Transformer Engine's (--transformer-impl, "auto" = when TE is usable here)."""
    impl = cfg.model.transformer_impl
    return impl == "transformer_engine" or (impl == "auto" and runtime.transformer_engine_available())


def build_model_chunks(cfg: Config) -> List[TempNetGPTModel]:
    """One chunk per virtual pipeline stage of this rank (one chunk without interleaving), on this rank's
    device, in params_dtype (TempNet in fp32). Needs megatron-core's parallel state (runtime.init_distributed).

    In "frozen_lm" mode only TempNet's parameters require gradients.
    """
    te = use_transformer_engine(cfg)
    dtype = params_dtype(cfg)
    tcfg = transformer_config(cfg, use_cpu_initialization=not runtime.use_cuda(), params_dtype=dtype,
                              use_transformer_engine=te)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = TempNetGPTModel(
            cfg, tcfg,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage, use_transformer_engine=te,
        )
        model.to(runtime.device())
        _lm_parameters_to(model, dtype)
        if cfg.train.mode == "frozen_lm":
            for name, p in model.named_parameters():
                p.requires_grad_(getattr(p, "is_tempnet_parameter", False))
        chunks.append(model)
    return chunks


def _lm_parameters_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """megatron-core's local spec builds its norms with torch's default fp32 weights whatever params_dtype
    says, and 16-bit activations then miss torch's fused norm kernels. Cast every LM parameter to
    params_dtype; TempNet's stay fp32 (see models/tempnet.py)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not getattr(p, "is_tempnet_parameter", False):
            p.data = p.data.to(dtype)


def unwrap(model: torch.nn.Module) -> TempNetGPTModel:
    """The model inside its wrappers (megatron-core DDP, Float16Module: each holds it as `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s] bool with True above the diagonal. Passed explicitly: megatron-core's default causal
    mask is built on a CUDA device."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]
