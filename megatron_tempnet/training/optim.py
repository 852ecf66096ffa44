"""megatron-core optimizer (Adam; distributed optimizer as an option) and warmup + decay schedule.

TempNet's parameters form their own parameter groups with their own learning rate (--tempnet-lr,
--tempnet-min-lr). The warm-up is shared; after it TempNet's rate stays constant (--tempnet-lr-schedule constant,
the default) or decays with the LM's (lm).

Without apex or Transformer Engine megatron-core steps torch's Adam, which on a CPU defaults to a Python
loop over the tensors (eight ops each); its fused CPU kernel updates every tensor of a group in one call.
"""
from __future__ import annotations

from typing import List

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from ..config import Config
from ..models.build import params_dtype


def build_optimizer(cfg: Config, model_chunks: List[torch.nn.Module]):
    t = cfg.train
    dtype = params_dtype(cfg)
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    overrides = get_standard_config_overrides(opt_cfg)  # no weight decay on biases and norms
    if cfg.tempnet.enabled:
        tn = cfg.tempnet  # "constant": the shared warm-up, then no decay (min_lr = max_lr)
        min_lr = tn.lr if tn.lr_schedule == "constant" else tn.min_lr
        overrides[ParamKey(attr="is_tempnet_parameter")] = {"max_lr": tn.lr, "min_lr": min_lr}
    optimizer = get_megatron_optimizer(opt_cfg, model_chunks, config_overrides=overrides)
    _fuse_cpu_adam(optimizer)
    return optimizer


def _fuse_cpu_adam(optimizer) -> None:
    """Use torch's fused Adam kernel for torch Adam instances whose parameters live on a CPU."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # apex / Transformer Engine FusedAdam: fused already
        for group in inner.param_groups:
            if all(p.device.type == "cpu" for p in group["params"]):
                group.update(fused=True, foreach=False)


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Schedule in samples, as Megatron-LM counts it: step(increment=global_batch_size) once per iteration."""
    t = cfg.train
    gbs = t.global_batch_size
    decay_iters = t.lr_decay_iters or t.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters * gbs,
        lr_decay_steps=max(decay_iters * gbs, t.lr_warmup_iters * gbs + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
    )
