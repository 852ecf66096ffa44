"""GPT-2 shape: learned absolute positions, LayerNorm, GeLU MLP, biases, tied input/output embeddings."""
from __future__ import annotations

import torch.nn.functional as F

from ..config import ModelConfig, ffn_hidden_size


def transformer_kwargs(m: ModelConfig) -> dict:
    """megatron-core TransformerConfig fields that make a GPT-2 block."""
    return dict(
        normalization="LayerNorm",
        activation_func=F.gelu,
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        ffn_hidden_size=ffn_hidden_size(m),
        num_query_groups=m.num_query_groups or m.num_attention_heads,
    )


def model_kwargs(m: ModelConfig) -> dict:
    """megatron-core GPTModel arguments for a GPT-2 model."""
    return dict(position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True)
