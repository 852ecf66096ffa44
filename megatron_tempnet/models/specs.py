"""Layer specs: which implementation builds each transformer layer, chosen without touching the model.

`local` is megatron-core's pure-torch spec (CPU and GPU), with torch's own linear at TP = 1 (models/linear.py);
`transformer_engine` is megatron-core's TE spec
(GPU, required for FP8). Both are wrapped so that every layer's initialisation is seeded by its global
layer number: the same seed gives the same weights at any TP/PP/VPP layout, so a parallel run can be
compared with the single-rank run from step 0.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from . import linear
from .attention import SDPAttention
from .attention_transfer import ExplicitAttention

# Offsets that keep the per-layer seeds apart from the embedding's and TempNet's streams.
LAYER_SEED_OFFSET = 1000
_SEED = {"base": 1234}


def set_init_seed(seed: int) -> None:
    """The base seed for layout-independent initialisation (set before building a model)."""
    _SEED["base"] = seed


def layer_init_seed(global_layer_number: int) -> int:
    return _SEED["base"] + LAYER_SEED_OFFSET + global_layer_number


class SeededTransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer, initialised from a seed that depends only on its global index."""

    def __init__(self, config, submodules, layer_number: int = 1, *args, vp_stage=None, **kwargs):
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        global_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        torch.manual_seed(layer_init_seed(global_number))
        super().__init__(config, submodules, layer_number, *args, vp_stage=vp_stage, **kwargs)


def _with_core_attention(spec: ModuleSpec, core_attention) -> ModuleSpec:
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=core_attention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))


def _with_local_linears(spec: ModuleSpec) -> ModuleSpec:
    attn, mlp = spec.submodules.self_attention, spec.submodules.mlp
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(
        attn.submodules, linear_qkv=linear.ColumnParallelLinear, linear_proj=linear.RowParallelLinear))
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(
        mlp.submodules, linear_fc1=linear.ColumnParallelLinear, linear_fc2=linear.RowParallelLinear))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn, mlp=mlp))


def layer_spec(normalization: str, use_transformer_engine: bool, explicit_attention: bool = False) -> ModuleSpec:
    """The transformer-layer spec for a block with `normalization` ("LayerNorm" or "RMSNorm", the model
    family's; Transformer Engine's spec reads it from the TransformerConfig instead).

    Transformer Engine's spec as megatron-core defines it; the local spec with torch's fused
    scaled_dot_product_attention in place of megatron-core's unfused DotProductAttention, and linears that
    are torch's own at TP = 1.
    `explicit_attention` (attention transfer): either spec with ExplicitAttention as the core attention,
    which forms the attention probabilities so they can be recorded, replaced or distilled.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization)
        spec = _with_local_linears(_with_core_attention(spec, SDPAttention))
    if explicit_attention:
        spec = _with_core_attention(spec, ExplicitAttention)
    return dataclasses.replace(spec, module=SeededTransformerLayer)
