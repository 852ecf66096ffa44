"""One of our checkpoints as a model for inference in this process: TP = PP = 1 on a 1-rank process group.

    model, cfg, ckpt = load_checkpoint_model("runs/x")          # a save folder or one iter_N folder
    logits, tau = forward(model, input_ids)                     # [b, s, V] (true vocabulary), [b, s] or None

The checkpoint can have been saved at any TP/PP: megatron-core's dist_checkpointing reshards it while
loading. Scripts that call this need an `if __name__ == "__main__":` guard (dist_checkpointing's helper
processes re-import the main module).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Optional, Tuple

import torch

from ..config import Config


def config_from_dict(d: dict) -> Config:
    """A Config from Config.to_dict() output; keys this version does not know are ignored, missing ones
    keep their defaults (checkpoints stay readable as the configuration grows)."""
    cfg = Config()
    for section in dataclasses.fields(Config):
        values = d.get(section.name) or {}
        target = getattr(cfg, section.name)
        known = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key in known:
                setattr(target, key, value)
    return cfg


def inference_config(saved: dict) -> Config:
    """The saved run's model at TP = PP = 1, with nothing that needs data, a teacher or another checkpoint."""
    cfg = config_from_dict(copy.deepcopy(saved))
    p = cfg.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = 1
    p.virtual_pipeline_model_parallel_size = None
    p.use_distributed_optimizer = p.sequence_parallel = False
    p.distributed_backend = "auto"
    cfg.data.mock_data = True
    cfg.data.data_path = []
    cfg.train.mode = "scratch"
    cfg.model.transformer_impl = "local"
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.0
    cfg.tempnet.dropout = 0.0
    cfg.loss.loss_impl = "reference"
    cfg.fp8.fp8_format = None
    cfg.checkpoint = type(cfg.checkpoint)()
    if hasattr(cfg, "attention_transfer"):
        cfg.attention_transfer = type(cfg.attention_transfer)()
    return cfg


def ensure_single_process_group(seed: int = 1234) -> None:
    """A 1-rank gloo (or NCCL) group with TP = PP = 1, unless this process already has one of size 1."""
    import torch.distributed as dist

    from .. import runtime
    from ..checkpoint import CheckpointError

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise CheckpointError("inference on our checkpoints runs in one process; start it without torchrun")
    if not dist.is_initialized():
        from ..cli import quiet_megatron_import_warnings

        quiet_megatron_import_warnings()
        # a lone process: runtime picks it a free port; a MASTER_PORT left in the environment (by the shell of a
        # training job, or a parent process's own group) may well be in use
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
    runtime.init_distributed(1, 1, seed=seed)


def build_model(cfg: Config):
    """The model of `cfg` at TP = PP = 1 (one chunk, no DDP), in eval mode."""
    from ..models.build import build_model_chunks

    model = build_model_chunks(cfg)[0]
    model.eval()
    return model


def load_checkpoint_model(path: str | os.PathLike):
    """(model, inference config, checkpoint folder) for a checkpoint of ours (a save folder: its latest;
    or one iter_N folder), weights loaded."""
    from ..checkpoint import load_model_weights, read_info, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    cfg = inference_config(read_info(ckpt)["config"])
    ensure_single_process_group(cfg.train.seed)
    model = build_model(cfg)
    load_model_weights(str(ckpt), [model], cfg)
    return model, cfg, ckpt


@torch.no_grad()
def forward(model, input_ids: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Full-sequence forward (no KV cache). input_ids [b, s] -> (logits [b, s, V] over the true vocabulary,
    fp32; tau [b, s] or None)."""
    from ..models.build import causal_mask

    device = next(model.parameters()).device
    ids = input_ids.to(device)
    b, s = ids.shape
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    logits, tau = model(ids, positions, causal_mask(s, device))
    logits = logits[..., : model.true_vocab_size].float()
    return logits, (tau.float() if tau is not None else None)
