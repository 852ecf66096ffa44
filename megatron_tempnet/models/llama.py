"""LLaMA shape: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases, untied embeddings."""
from __future__ import annotations

import torch.nn.functional as F

from ..config import ModelConfig, ffn_hidden_size


def transformer_kwargs(m: ModelConfig) -> dict:
    """megatron-core TransformerConfig fields that make a LLaMA block."""
    return dict(
        normalization="RMSNorm",
        activation_func=F.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        ffn_hidden_size=ffn_hidden_size(m),
        num_query_groups=m.num_query_groups or m.num_attention_heads,
    )


def model_kwargs(m: ModelConfig) -> dict:
    """megatron-core GPTModel arguments for a LLaMA model."""
    return dict(
        position_embedding_type="rope",
        rotary_base=m.rotary_base,
        share_embeddings_and_output_weights=False,
    )
