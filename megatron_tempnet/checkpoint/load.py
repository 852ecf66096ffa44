"""Loading checkpoints into a run: the full training state (resume), or the model weights only.

Resuming (`--load DIR`) restores weights, optimizer, scheduler, per-rank RNG states (only at the layout
they were saved at: a different TP/PP/DP has other ranks, so they are left as seeded, with a note),
iteration and consumed samples; the data iterators restart at the consumed samples, so the resumed run
gives the same losses and weights as an uninterrupted one. `--load` may name a save folder (its tracker
is followed) or one `iter_N` folder. `--pretrained-checkpoint DIR` loads the model weights only
(`load_model_weights`), e.g. an LM converted from Hugging Face, with a fresh TempNet. Every load first
checks the checkpoint's model and files (compat.py, integrity.py) and reads through safe_load.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from ..config import Config
from .compat import check_layout_fits, check_model_matches
from .folders import CheckpointError, read_info, resolve_checkpoint
from .integrity import verify_checkpoint
from ..models.build import unwrap
from .optimizer_state import load_optimizer_state, main_params_from_model_weights, switch_optimizer_format
from .safe_load import checkpoint_tensor_shapes, safe_dist_load
from .state import (model_key, model_sharded_state_dict, parallel_layout, set_rng_state, sharded_state_dict_metadata,
                    training_state_dict)


@dataclass
class LoadedState:
    """What `load_checkpoint` restored besides tensors."""

    iteration: int
    consumed_samples: int
    path: str
    rng_restored: bool


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def check_integrity(ckpt: Path, cfg: Optional[Config]) -> None:
    """Refuse a damaged checkpoint before any tensor is read (integrity.py); sizes always, hashes
    unless --no-verify-checkpoint. Called on every rank (the ranks share the hashing)."""
    hashes = cfg is None or cfg.checkpoint.verify_checkpoint
    if not verify_checkpoint(ckpt, hashes=hashes):
        _log(f"note: {ckpt} has no recorded checksums (written by an older megatron-tempnet): it loads unverified")


def load_checkpoint(cfg: Config, model: List[torch.nn.Module], optimizer, scheduler,
                    path: Optional[str] = None) -> Optional[LoadedState]:
    """Restore a full training state from `path` (default --load) into this run's model, optimizer and
    scheduler, at this run's layout. Returns None when --load is the --save folder and holds no checkpoint
    yet (a fresh start), else what was restored. Called on every rank."""
    path = path or cfg.checkpoint.load
    allow_empty = bool(cfg.checkpoint.save) and Path(path).resolve() == Path(cfg.checkpoint.save).resolve()
    ckpt = resolve_checkpoint(path, allow_empty=allow_empty)
    if ckpt is None:
        _log(f"no checkpoint in {path} yet: starting from scratch")
        return None
    info = read_info(ckpt)
    if "optimizer" not in info["contents"]:
        raise CheckpointError(
            f"{ckpt} holds model weights only (no optimizer state), so a run cannot resume from it; "
            f"start from it with --pretrained-checkpoint {ckpt}")
    saved = info["config"]
    check_layout_fits(saved["model"], cfg.parallel.tensor_model_parallel_size,
                      cfg.parallel.pipeline_model_parallel_size, cfg.parallel.virtual_pipeline_model_parallel_size)
    check_model_matches(saved, cfg, str(ckpt), tempnet_optional=False)
    if saved["train"]["mode"] != cfg.train.mode:
        raise CheckpointError(
            f"{ckpt} was saved in --mode {saved['train']['mode']}, this run uses --mode {cfg.train.mode}: their "
            f"optimizers differ; resume with --mode {saved['train']['mode']}, or start the new mode from the "
            f"weights with --pretrained-checkpoint {ckpt}")
    check_integrity(ckpt, cfg)
    layout = parallel_layout()
    same_layout = all(info["layout"].get(k) == layout[k] for k in ("tp", "pp", "dp"))
    sd = training_state_dict(model, optimizer, scheduler, is_loading=True, with_rng=same_layout, layout=layout)
    scheduler_template = sd.pop("scheduler", None)
    if cfg.parallel.use_distributed_optimizer and not saved["parallel"]["use_distributed_optimizer"]:
        main_params_from_model_weights(sd, ckpt)
    loaded = safe_dist_load(sd, ckpt)
    for i, chunk in enumerate(model):
        unwrap(chunk).load_state_dict(loaded[model_key(i, len(model))], strict=True)
    opt_sd = loaded["optimizer"]
    if bool(saved["parallel"]["use_distributed_optimizer"]) != bool(cfg.parallel.use_distributed_optimizer):
        opt_sd = switch_optimizer_format(opt_sd, to_distributed=bool(cfg.parallel.use_distributed_optimizer))
    load_optimizer_state(optimizer, opt_sd)
    if scheduler is not None and scheduler_template is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    else:
        _log(f"note: {ckpt} was saved at TP={info['layout']['tp']} PP={info['layout']['pp']} DP={info['layout']['dp']}, "
             f"this run is TP={layout['tp']} PP={layout['pp']} DP={layout['dp']}: weights, optimizer and schedule "
             "are resharded; per-rank RNG states are not restored (the ranks differ)")
    _log(f"loaded checkpoint {ckpt} (iteration {info['iteration']}, {info['consumed_samples']} samples consumed)")
    return LoadedState(int(loaded["iteration"]), int(loaded["consumed_samples"]), str(ckpt), same_layout)


def load_model_weights(path: str, model: List[torch.nn.Module], cfg: Optional[Config] = None) -> Path:
    """Load only the model weights of a checkpoint (any layout) into `model` (finetune / frozen_lm).

    TempNet weights are loaded when the checkpoint has them with the same shape; otherwise TempNet keeps
    its fresh initialisation (an LM trained without TempNet, or converted from Hugging Face)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    ckpt = resolve_checkpoint(path)
    info = read_info(ckpt)
    if cfg is not None:
        check_model_matches(info["config"], cfg, str(ckpt), tempnet_optional=True)
    check_integrity(ckpt, cfg)
    shapes = checkpoint_tensor_shapes(ckpt)
    metadata = sharded_state_dict_metadata()
    sd = {}
    skipped_tempnet = False
    for i, chunk in enumerate(model):
        chunk_sd = model_sharded_state_dict(chunk, metadata)
        for key in list(chunk_sd):
            sh = chunk_sd[key]
            skey = getattr(sh, "key", None)
            if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                del chunk_sd[key]  # layers' _extra_state objects: no weights
                continue
            if key.startswith("tempnet."):
                gshape = tuple(getattr(sh, "global_shape", ()))
                if skey not in shapes or shapes[skey] != gshape:
                    del chunk_sd[key]
                    skipped_tempnet = True
            elif skey not in shapes:
                raise CheckpointError(
                    f"{ckpt} has no tensor {skey}, which this model needs; it holds another architecture "
                    f"(its config: arch {info['config']['model']['arch']}); pass a checkpoint of this model")
        sd[model_key(i, len(model))] = chunk_sd
    loaded = safe_dist_load(sd, ckpt)
    for i, chunk in enumerate(model):
        missing, _ = unwrap(chunk).load_state_dict(loaded[model_key(i, len(model))], strict=False)
        missing = [k for k in missing if not k.startswith("tempnet.") and not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{ckpt} lacks weights {missing[:5]}; pass a checkpoint of this model")
    if skipped_tempnet:
        _log(f"note: {ckpt} has no TempNet of this shape: TempNet starts from its initialisation")
    _log(f"loaded model weights from {ckpt}")
    return ckpt
