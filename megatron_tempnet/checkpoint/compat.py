"""Compatibility checks: a checkpoint's model against this run's, and against a TP/PP layout.

They read only tempnet_checkpoint.json's "config" (no tensor), so a mismatch is refused with the flags
that differ before any work is done.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Config, ModelConfig
from ..models.registry import model_dims
from .folders import INFO_FILE, CheckpointError


def _shape_fields(cfg_model: dict, tempnet: dict) -> dict:
    """What fixes the shapes of a model's tensors, from a saved (or this run's) config's model and tempnet
    sections; keys name the fields in error messages (their flags in _FLAG)."""
    m = ModelConfig(**{k: v for k, v in cfg_model.items() if k in ModelConfig.__dataclass_fields__})
    dims = model_dims(m)
    return {
        "arch": m.arch, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_query_groups or m.num_attention_heads,
        "ffn_hidden_size": dims.ffn_hidden_size,
        "padded vocabulary": dims.padded_vocab_size,
        "position embeddings": dims.position_embeddings,
        "tied embeddings": dims.tied_embeddings,
        "tempnet": bool(tempnet.get("enabled")),
        "tempnet_kind": tempnet.get("kind", "network") if tempnet.get("enabled") else None,
        "tempnet_hidden_size": tempnet.get("hidden_size") if tempnet.get("enabled") and
        tempnet.get("kind", "network") == "network" else None,
    }


_FLAG = {"arch": "--arch", "num_layers": "--num-layers", "hidden_size": "--hidden-size",
         "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
         "ffn_hidden_size": "--ffn-hidden-size", "padded vocabulary": "--vocab-size / --make-vocab-size-divisible-by",
         "position embeddings": "--max-position-embeddings / --seq-length",
         "tied embeddings": "--untie-embeddings-and-output-weights", "tempnet": "--tempnet-enabled",
         "tempnet_kind": "--tempnet-kind", "tempnet_hidden_size": "--tempnet-hidden-size"}


def check_layout_fits(saved_model: dict, tp: int, pp: int, vpp: Optional[int] = None) -> None:
    """Refuse a TP/PP that cannot hold a checkpoint's model, naming the sizes that would work."""
    f = _shape_fields(saved_model, {})
    problems = []
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
    for what, n in (("attention heads", f["num_attention_heads"]), ("query groups", f["num_query_groups"]),
                    ("FFN hidden size", f["ffn_hidden_size"])):
        if n % tp:
            problems.append(f"its {n} {what} do not split over TP={tp}")
    if f["padded vocabulary"] and f["padded vocabulary"] % tp:
        problems.append(f"its padded vocabulary {f['padded vocabulary']} does not split over TP={tp}")
    stages = pp * (vpp or 1)
    if f["num_layers"] % stages:
        problems.append(f"its {f['num_layers']} layers do not split over {stages} pipeline stages")
    if problems:
        tps = [d for d in divisors(f["num_query_groups"]) if f["num_attention_heads"] % d == 0
               and f["ffn_hidden_size"] % d == 0 and (not f["padded vocabulary"] or f["padded vocabulary"] % d == 0)]
        raise CheckpointError(
            f"the checkpoint's model cannot be laid out at TP={tp} x PP={pp}: {'; '.join(problems)}. "
            f"Use a TP in {tps} and a PP in {divisors(f['num_layers'])}")


def check_model_matches(saved_cfg: dict, cfg: Config, where: str, *, tempnet_optional: bool) -> None:
    """Refuse a checkpoint whose model shape differs from this run's, naming each difference."""
    saved = _shape_fields(saved_cfg["model"], saved_cfg.get("tempnet", {}))
    here = _shape_fields(vars(cfg.model), vars(cfg.tempnet))
    keys = [k for k in saved if k not in (("tempnet", "tempnet_kind", "tempnet_hidden_size") if tempnet_optional else ())]
    diffs = [k for k in keys if saved[k] != here[k]]
    if diffs:
        lines = "; ".join(f"{_FLAG[k]}: checkpoint {saved[k]}, this run {here[k]}" for k in diffs)
        raise CheckpointError(
            f"checkpoint {where} holds another model shape ({lines}); run with the checkpoint's model flags "
            f"(they are in {Path(where) / INFO_FILE})")
