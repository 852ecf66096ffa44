"""Family-independent Hugging Face conversion: which family's adapter converts a model (models/<family>/
hf_adapter.py: the config and the state dict, both ways), the transformers config object, and TempNet.

With TempNet the model is modeling_tempnet.py's subclass of the family's transformers class: TempNet's
tensors under "tempnet." and its config in config.json's "tempnet" entry. TempNet's W1 [d, V] has our padded
vocabulary as columns; Hugging Face gets the true vocabulary (columns beyond it dropped; zeros on import).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..config import Config, ModelConfig
from ..models.hf_mapping import ConversionError
from ..models.registry import FAMILIES, get_family

__all__ = ["ConversionError", "hf_adapter", "hf_config", "to_hf_state_dict", "tempnet_hf_config", "tempnet_to_hf",
           "check_hf_config", "model_config_from_hf", "from_hf_state_dict", "tempnet_from_hf"]


def hf_adapter(m: ModelConfig):
    """The Hugging Face adapter of our model `m`: its family's (models/<family>/hf_adapter.py)."""
    adapter = get_family(m.arch).hf
    if adapter is None:
        raise ConversionError(f"--arch {m.arch} has no Hugging Face conversion; families with one: "
                              f"{', '.join(f.name for f in _convertible())}")
    return adapter(m)


def _convertible() -> list:
    """The registered families that have a Hugging Face adapter."""
    return [f for f in FAMILIES.values() if f.hf is not None]


# ------------------------------------------------------------------------------------------------------
# ours -> Hugging Face
# ------------------------------------------------------------------------------------------------------


def hf_config(cfg: Config, special_ids: Dict[str, int], tempnet: Optional[dict] = None):
    """transformers config for our model (true vocabulary, fp32); with `tempnet` (tempnet_hf_config's) the
    TempNet model's config (configuration_tempnet.py), which carries it."""
    from transformers import AutoConfig

    adapter = hf_adapter(cfg.model)
    kwargs = adapter.to_hf_config(special_ids)  # (save_pretrained writes the architectures)
    if not tempnet:
        return AutoConfig.for_model(adapter.model_type, **kwargs)
    from .configuration_tempnet import tempnet_config_class

    return tempnet_config_class(adapter.model_type)(tempnet=tempnet, **kwargs)


def to_hf_state_dict(cfg: Config, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our TP = 1 model state dict (module keys, e.g. decoder.layers.0.self_attention.linear_qkv.weight)
    -> the Hugging Face model's state dict."""
    return hf_adapter(cfg.model).to_hf(sd)


def tempnet_hf_config(cfg: Config) -> dict:
    """config.json's "tempnet" entry for our run's TempNet."""
    t = cfg.tempnet
    return {"kind": getattr(t, "kind", "network"), "tau_min": t.tau_min, "tau_max": t.tau_max,
            "vocab_size": cfg.model.vocab_size, "hidden_size": t.hidden_size, "input_variant": t.input_variant,
            "scale_input": bool(getattr(t, "scale_input", False))}


def tempnet_to_hf(cfg: Config, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """TempNet's tensors of our model state dict, without their "tempnet." prefix (W1: the true vocabulary)."""
    tensors = {k[len("tempnet."):]: v.detach().clone().contiguous() for k, v in sd.items()
               if k.startswith("tempnet.") and isinstance(v, torch.Tensor)}
    if "w1" in tensors:
        tensors["w1"] = tensors["w1"][:, :cfg.model.vocab_size].contiguous()
    return tensors


# ------------------------------------------------------------------------------------------------------
# Hugging Face -> ours
# ------------------------------------------------------------------------------------------------------


def _adapter_class_for_hf(hf_cfg: dict, where: str):
    """The adapter class whose Hugging Face model_type is the config's; refuses any other, naming those that convert."""
    mtype = hf_cfg.get("model_type")
    adapters = [f.hf for f in _convertible()]
    for adapter in adapters:
        if adapter.model_type == mtype:
            return adapter
    archs = hf_cfg.get("architectures") or []
    kinds = [f"{a.label} folders (model_type {a.model_type!r}, {a.architecture})" for a in adapters]
    known = " and ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)
    raise ConversionError(
        f"{where} holds a {'/'.join(archs) or mtype or 'model of unknown type'} (model_type {mtype!r}); only {known} "
        "convert to our checkpoints. Convert the model to one of those layouts first, or train it here from scratch")


def check_hf_config(hf_cfg: dict, where: str) -> None:
    """Refuse a Hugging Face model that none of our families can represent exactly, naming what differs."""
    model_config_from_hf(hf_cfg, where)


def model_config_from_hf(hf_cfg: dict, where: str = "the Hugging Face folder") -> ModelConfig:
    """Our model config for a Hugging Face config.json (ConversionError when no family represents it exactly)."""
    return _adapter_class_for_hf(hf_cfg, where).from_hf_config(hf_cfg, where)


def from_hf_state_dict(m: ModelConfig, hf: Dict[str, torch.Tensor],
                       tie_word_embeddings: bool) -> Dict[str, torch.Tensor]:
    """A Hugging Face state dict -> our TP = 1 model state dict (fp32; vocabulary padded with zeros)."""
    return hf_adapter(m).from_hf(hf, tie_word_embeddings=tie_word_embeddings)


def tempnet_from_hf(config: dict, tensors: Dict[str, torch.Tensor], padded_vocab: int) -> Dict[str, torch.Tensor]:
    out = {f"tempnet.{k}": v.float() for k, v in tensors.items()}
    if "tempnet.w1" in out:
        w1 = torch.zeros(out["tempnet.w1"].shape[0], padded_vocab)
        w1[:, : out["tempnet.w1"].shape[1]] = out["tempnet.w1"]
        out["tempnet.w1"] = w1
    return out
