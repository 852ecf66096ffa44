"""Qwen2 shape: LLaMA (rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention) plus biases on the QKV
projection; untied embeddings unless --untie-embeddings-and-output-weights false ties them; the rotary base is
--rotary-base (Qwen2's own models use 1000000)."""
from __future__ import annotations

import torch.nn.functional as F

from ..family import ModelFamily
from ..llama import default_ffn_hidden_size
from .hf_adapter import Qwen2HFAdapter

FAMILY = ModelFamily(
    name="qwen2", normalization="RMSNorm", activation=F.silu, gated_mlp=True, linear_biases=False,
    qkv_biases=True, learned_positions=False, tied_embeddings=False, default_ffn_hidden_size=default_ffn_hidden_size,
    hf=Qwen2HFAdapter,
)
