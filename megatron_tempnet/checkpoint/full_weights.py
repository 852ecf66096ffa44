"""Our checkpoint's model weights as the state dict of the TP = PP = 1 model built with the local spec,
read in this process without torch.distributed (no model is built, no process group started).

A checkpoint stores megatron-core's global tensors, whatever the TP/PP/VPP layout it was saved at: TP shards
joined, each layer's tensors stacked on dim 0 under one key ("decoder.layers.self_attention.linear_qkv.weight"
[layers, ...]), and some modules under the names their Transformer Engine counterparts have (the layer
spec's sharded_state_dict_keys_map, e.g. input_layernorm.weight stored as
self_attention.linear_qkv.layer_norm_weight). This module undoes both, so the result has the keys of
`model.state_dict()` (decoder.layers.0.input_layernorm.weight, ...), which the families' Hugging Face adapters convert (hf/io.py).
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from ..config import ModelConfig
from .safe_load import read_checkpoint_tensors

LAYERS = "decoder.layers."
# the top-level modules of our model (megatron-core's GPTModel plus TempNet); the rest is the optimizer's
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "tempnet.")


def unstack_layers(tensors: Dict[str, torch.Tensor], keys_map: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """Global checkpoint tensors -> module keys: each decoder.layers.X [layers, ...] becomes decoder.layers.{i}.X
    (X renamed back through `keys_map`, {module prefix: stored prefix}); other keys are kept."""
    stored_to_module = {stored: module for module, stored in keys_map.items()}
    out = {}
    for key, tensor in tensors.items():
        if not key.startswith(LAYERS):
            out[key] = tensor
            continue
        rest = key[len(LAYERS):]
        for stored, module in stored_to_module.items():
            if rest.startswith(stored):
                rest = module + rest[len(stored):]
                break
        for i, layer in enumerate(tensor.unbind(0)):
            out[f"{LAYERS}{i}.{rest}"] = layer
    return out


def full_model_state_dict(ckpt_dir: str | os.PathLike, m: ModelConfig) -> Dict[str, torch.Tensor]:
    """The model weights of the checkpoint folder `ckpt_dir` (one iter_N folder), of the model `m`, as full CPU
    tensors under the TP = 1 local model's keys."""
    from ..models.registry import get_family
    from ..models.specs import layer_spec

    spec = layer_spec(get_family(m.arch).normalization, use_transformer_engine=False)
    keys_map = spec.submodules.sharded_state_dict_keys_map
    tensors = {}
    for prefix in MODEL_PREFIXES:
        tensors.update(read_checkpoint_tensors(ckpt_dir, prefix))
    return unstack_layers(tensors, keys_map)
