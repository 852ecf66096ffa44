"""GPT-2 shape: learned absolute positions, LayerNorm, GeLU MLP, biases, tied input/output embeddings."""
from __future__ import annotations

import torch.nn.functional as F

from ..family import ModelFamily
from .hf_adapter import GPTHFAdapter


def default_ffn_hidden_size(hidden_size: int) -> int:
    """GPT-2's MLP is four times as wide as the residual stream."""
    return 4 * hidden_size


FAMILY = ModelFamily(
    name="gpt", normalization="LayerNorm", activation=F.gelu, gated_mlp=False, linear_biases=True,
    qkv_biases=True, learned_positions=True, tied_embeddings=True, default_ffn_hidden_size=default_ffn_hidden_size,
    hf=GPTHFAdapter,
)
