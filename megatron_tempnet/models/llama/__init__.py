"""LLaMA shape: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases, untied embeddings."""
from __future__ import annotations

import math

import torch.nn.functional as F

from ..family import ModelFamily
from .hf_adapter import LlamaHFAdapter


def default_ffn_hidden_size(hidden_size: int) -> int:
    """8/3 x hidden (SwiGLU's three matrices cost what GPT's two of 4 x hidden do), rounded up to 64."""
    return int(math.ceil(8 * hidden_size / 3 / 64) * 64)


FAMILY = ModelFamily(
    name="llama", normalization="RMSNorm", activation=F.silu, gated_mlp=True, linear_biases=False,
    qkv_biases=False, learned_positions=False, tied_embeddings=False, default_ffn_hidden_size=default_ffn_hidden_size,
    hf=LlamaHFAdapter,
)
