"""What every family's Hugging Face adapter (models/<family>/hf_adapter.py) shares: the adapter's interface
(HFAdapter, what ModelFamily.hf names), the conversion error, megatron-core's grouped QKV layout, the padded
vocabulary and the checks of a Hugging Face rotary config.

megatron-core's attention `linear_qkv.weight` [G * (n + 2) * hd, h] (and its bias [G * (n + 2) * hd]) is grouped
per key/value group g: the n query heads of g, then k_g, then v_g (G groups, n = heads / G query heads per
group, hd = head size). Hugging Face keeps q [H * hd, h], k [G * hd, h] and v [G * hd, h] apart (or, GPT-2,
concatenated as [q; k; v]). The layout is the same at every TP: the checkpoint stores the TP shards of each
group one after the other.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, List, Tuple

import torch

from ..config import ModelConfig


class ConversionError(ValueError):
    """A model that cannot be converted. The message names the problem and the fix."""


class HFAdapter(ABC):
    """Converts one model of ours (`m`) to and from one transformers architecture, on full (unsharded) state
    dicts: ours with the keys of the TP = PP = 1 model built with the local spec, theirs as transformers has them.

    A family's adapter sets the four names below and implements to_hf_config (the transformers config's
    arguments), hf_config_problems (what a config.json has that our model has not), model_config, to_hf and
    from_hf; hf/ does the rest (folders, TempNet, tokenizer) the same for every family."""

    model_type: str  # config.json's
    architecture: str  # the transformers class
    label: str  # how messages name it
    arch: str  # our --arch of the models it converts

    def __init__(self, m: ModelConfig) -> None:
        from .registry import model_dims  # (the registry imports the families, which name their adapters)

        self.m, self.dims = m, model_dims(m)

    @abstractmethod
    def to_hf_config(self, special_ids: Dict[str, int]) -> dict:
        """The transformers config's arguments (true vocabulary, fp32); special_ids: "bos" / "eos" / "pad"."""

    @classmethod
    @abstractmethod
    def hf_config_problems(cls, hf_cfg: dict) -> List[str]:
        """What a Hugging Face config.json of this model type has that our model has not."""

    @classmethod
    def from_hf_config(cls, hf_cfg: dict, where: str) -> ModelConfig:
        """Our model config for a Hugging Face config.json (from `where`); refuses (ConversionError) one our model
        cannot represent exactly, naming what differs."""
        problems = cls.hf_config_problems(hf_cfg)
        if problems:
            raise ConversionError(f"{where}: this {cls.label} uses {', '.join(problems)}, which our --arch {cls.arch} "
                                  "does not have; it cannot be converted exactly")
        return cls.model_config(hf_cfg)

    @classmethod
    @abstractmethod
    def model_config(cls, hf_cfg: dict) -> ModelConfig:
        """Our model config for a Hugging Face config.json that hf_config_problems accepts."""

    @abstractmethod
    def to_hf(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Our full state dict -> the Hugging Face model's (copies; the true vocabulary)."""

    @abstractmethod
    def from_hf(self, hf: Dict[str, torch.Tensor], *, tie_word_embeddings: bool) -> Dict[str, torch.Tensor]:
        """A Hugging Face state dict -> our full state dict (fp32; the vocabulary padded with zero rows)."""


def attention_dims(m: ModelConfig) -> Tuple[int, int, int, int]:
    """(heads H, key/value groups G, head size hd, query heads per group n)."""
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    return heads, groups, m.hidden_size // heads, heads // groups


def split_qkv(w: torch.Tensor, m: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear_qkv weight [G*(n+2)*hd, h] or bias [G*(n+2)*hd] -> (q [H*hd, ...], k [G*hd, ...], v [G*hd, ...])."""
    heads, groups, hd, n = attention_dims(m)
    rest = w.shape[1:]
    g = w.reshape(groups, n + 2, hd, *rest)
    q = g[:, :n].reshape(heads * hd, *rest)
    k = g[:, n].reshape(groups * hd, *rest)
    v = g[:, n + 1].reshape(groups * hd, *rest)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """The inverse of split_qkv: (q, k, v) -> megatron-core's grouped linear_qkv weight or bias."""
    heads, groups, hd, n = attention_dims(m)
    rest = q.shape[1:]
    g = torch.cat([q.reshape(groups, n, hd, *rest), k.reshape(groups, 1, hd, *rest), v.reshape(groups, 1, hd, *rest)],
                  dim=1)
    return g.reshape(groups * (n + 2) * hd, *rest)


def pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """`w` [V, ...] with zero rows appended up to `rows` (our padded vocabulary; Hugging Face has the true one)."""
    out = torch.zeros(rows, *w.shape[1:], dtype=w.dtype)
    out[: w.shape[0]] = w
    return out


def rope_theta(hf_cfg: dict) -> float:
    """The rotary base of a Hugging Face config.json (transformers 5's rope_parameters, or the older rope_theta)."""
    rope = hf_cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))


def rope_problems(hf_cfg: dict) -> List[str]:
    """What a Hugging Face rotary config has that megatron-core's plain RoPE with an integer base has not."""
    problems = []
    rope = hf_cfg.get("rope_parameters") or hf_cfg.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} (only plain RoPE)")
    theta = rope_theta(hf_cfg)
    if theta != int(theta):
        problems.append(f"rope_theta {theta} is not an integer (our --rotary-base is)")
    return problems
