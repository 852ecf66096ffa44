"""Core attention through torch's scaled_dot_product_attention, for the local (non-Transformer-Engine) spec.

megatron-core's local DotProductAttention materialises the [b, heads, s, s] scores in Python-level steps
(baddbmm, mask, softmax, bmm); torch's SDPA runs fused kernels (flash attention on CPUs and GPUs). Same
math, same parameters (there are none), so checkpoints do not change. Grouped-query attention goes to SDPA
as is (enable_gqa). The causal case ignores the mask tensor and uses SDPA's own causal masking; any other
mask is passed through (megatron-core's True = masked becomes SDPA's False = masked).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, softmax_scale: Optional[float] = None, **_unused):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention does not implement context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        """query: [sq, b, heads, d]; key, value: [sk, b, groups, d] -> [sq, b, heads * d]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention supports neither attention_bias nor packed sequences")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        mask = None if causal or attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal,
            scale=self.scale, enable_gqa=k.size(1) != q.size(1))
        sq, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
