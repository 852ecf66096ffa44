"""From the settings a user gave to the run that trains: every check, and everything derived, before any work.

    parser = build_parser()                                   # the trainer's flags, --arch's families included
    cfg, args = load_config(argv, parser=parser)
    run = finalize(cfg, world_size, cuda_available=..., te_available=...)
    train(run.cfg, tokenizer=run.tokenizer)

config.py knows the settings alone; this layer adds what needs more: the model family (models/registry.py)
and its sizes, Transformer Engine's FP8 recipes (fp8_support.py), the tokenizer's vocabulary (loaded once and
handed on) and an attention-transfer teacher's checkpoint. `finalize` returns a resolved copy; the caller's
Config is never changed.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from . import config
from .config import Config, ConfigError, validate_config
from .models.family import ModelDims, ModelFamily
from .models.registry import family_names, get_family


@dataclass(frozen=True)
class FinalizedRun:
    """A resolved configuration with what was derived for it.

    cfg: a copy with the vocabulary from the tokenizer and the optimizer choice filled in; tokenizer: the
    loaded tokenizer (None with --mock-data or without --tokenizer-model); family, dims: cfg.model's model
    family and sizes (the FFN width among them)."""

    cfg: Config
    tokenizer: Optional[Any]
    family: ModelFamily
    dims: ModelDims


def build_parser(parents: Sequence[argparse.ArgumentParser] = (), **kwargs) -> argparse.ArgumentParser:
    """config.build_parser with the registered model families as --arch's choices."""
    return config.build_parser(parents, choices={"model.arch": family_names()}, **kwargs)


def _check_shapes(cfg: Config, dims: ModelDims) -> None:
    """The family's sizes split over TP."""
    tp = cfg.parallel.tensor_model_parallel_size
    if dims.ffn_hidden_size % tp != 0:
        raise ConfigError(f"FFN hidden size {dims.ffn_hidden_size} is not divisible by TP {tp}; set --ffn-hidden-size")
    if dims.padded_vocab_size is not None and dims.padded_vocab_size % tp != 0:
        raise ConfigError(
            f"padded vocabulary {dims.padded_vocab_size} is not divisible by TP {tp}; "
            f"set --make-vocab-size-divisible-by to a multiple of {tp}"
        )


def _check_fp8(cfg: Config, dims: ModelDims, *, cuda_available: bool, te_available: bool) -> None:
    """FP8 through Transformer Engine: BF16 weights (fp32 master copies in the optimizer), a recipe that the
    installed TE runs on this GPU (fp8_support.py), and matrix dimensions that FP8 products accept."""
    from . import fp8_support

    m, t, f = cfg.model, cfg.train, cfg.fp8  # (their choices are checked with every field's, config_fields.CHOICES)
    if not cuda_available:
        raise ConfigError(
            "--fp8-format needs a CUDA GPU (FP8 runs through Transformer Engine); "
            "drop --fp8-format to train in fp32/bf16 here"
        )
    if not te_available:
        raise ConfigError(
            "--fp8-format needs Transformer Engine; install it on the GPU machine (examples/gpu/README.md) "
            "or drop --fp8-format"
        )
    if m.transformer_impl == "local":
        raise ConfigError("--fp8-format needs --transformer-impl transformer_engine (or auto), not local")
    if t.precision in ("fp32", "fp16"):
        raise ConfigError(f"--fp8-format trains BF16 weights with fp32 master copies; use --precision bf16 (or auto), "
                          f"not {t.precision}")
    tp = cfg.parallel.tensor_model_parallel_size
    tokens = m.seq_length * t.micro_batch_size // (tp if cfg.parallel.sequence_parallel else 1)
    sizes = {"--hidden-size": m.hidden_size, "FFN size per TP rank": dims.ffn_hidden_size // tp,
             "tokens per micro-batch and rank (seq-length x micro-batch-size)": tokens}
    odd = [f"{name} {value}" for name, value in sizes.items() if value % 16]
    if odd:
        raise ConfigError(f"FP8 matrix products need dimensions divisible by 16; {', '.join(odd)} is not: "
                          "change them or drop --fp8-format")
    problem = fp8_support.recipe_problem(f.fp8_recipe)
    if problem:
        raise ConfigError(problem)


def validate(cfg: Config, world_size: int, *, cuda_available: bool, te_available: bool) -> None:
    """Every check of a run that needs no tokenizer: config.validate_config's, the model family (--arch), its
    sizes over TP, FP8 and an attention-transfer teacher. Raises a ConfigError naming the problem and the fix.

    Called on every rank before any collective, so a bad run fails in seconds, identically everywhere.
    """
    family = get_family(cfg.model.arch)  # first, as --arch is the first field
    validate_config(cfg, world_size, cuda_available=cuda_available, te_available=te_available)
    dims = family.dims(cfg.model)
    _check_shapes(cfg, dims)
    if cfg.fp8.fp8_format is not None:
        _check_fp8(cfg, dims, cuda_available=cuda_available, te_available=te_available)
    if cfg.attention_transfer.mode != "none":
        from .training.attention_transfer import check_teacher  # reads the teacher checkpoint's description

        check_teacher(cfg)  # exists, same layers / heads / vocabulary, fits this TP/PP


def vocabulary(cfg: Config, tokenizer: Optional[Any] = None) -> tuple[Optional[int], Optional[Any]]:
    """(the model's vocabulary size, the tokenizer): --vocab-size, else the tokenizer's; the tokenizer is
    `tokenizer`, else loaded from --tokenizer-model when the data needs one (None with --mock-data). Refuses a
    --vocab-size that differs from the tokenizer's."""
    if cfg.data.mock_data or not cfg.data.tokenizer_model:
        return cfg.model.vocab_size, tokenizer  # validate() says what is missing
    if tokenizer is None:
        from .data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({cfg.model.vocab_size}, --vocab-size) differs from the tokenizer's "
            f"({tokenizer.vocab_size}, {cfg.data.tokenizer_model}); drop --vocab-size to use the tokenizer's, "
            "or pass the tokenizer the data was made with")
    return tokenizer.vocab_size, tokenizer


def with_optimizer_choice(cfg: Config) -> Config:
    """`cfg`, or a copy with the distributed optimizer switched on where the run needs it: 16-bit training with
    TempNet. TempNet keeps fp32 weights (models/tempnet.py); megatron-core's plain bf16/fp16 optimizer steps such
    a mix of 16-bit and fp32 parameters but cannot checkpoint it (its sharded state dict takes every parameter
    to be 16-bit), while the distributed optimizer handles both. On one data-parallel rank it is the same
    optimizer, unsharded."""
    import torch

    from .models.build import params_dtype

    if cfg.parallel.use_distributed_optimizer or not cfg.tempnet.enabled or params_dtype(cfg) == torch.float32:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.parallel.use_distributed_optimizer = True
    return cfg


def resolve(cfg: Config, *, tokenizer: Optional[Any] = None) -> FinalizedRun:
    """The derived parts of `finalize` without its checks, for a configuration already checked (train() calls
    it; with the tokenizer finalize loaded, nothing is loaded again)."""
    vocab_size, tokenizer = vocabulary(cfg, tokenizer)
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size = vocab_size
    cfg = with_optimizer_choice(cfg)
    family = get_family(cfg.model.arch)
    return FinalizedRun(cfg=cfg, tokenizer=tokenizer, family=family, dims=family.dims(cfg.model))


def finalize(cfg: Config, world_size: int, *, cuda_available: bool, te_available: bool,
             tokenizer: Optional[Any] = None) -> FinalizedRun:
    """The run `cfg` describes, checked (validate) and resolved (resolve), as a copy: the vocabulary from the
    tokenizer (loaded here once, unless given), the model family's sizes, the optimizer choice."""
    vocab_size, tokenizer = vocabulary(cfg, tokenizer)  # first: the checks need the vocabulary
    checked = copy.deepcopy(cfg)
    checked.model.vocab_size = vocab_size
    validate(checked, world_size, cuda_available=cuda_available, te_available=te_available)
    return resolve(checked, tokenizer=tokenizer)
