"""SDPAttention (the local spec's core attention) equals megatron-core's DotProductAttention."""
import pytest
import torch


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)])
def test_sdpa_equals_megatron_dot_product_attention(single_rank, heads, groups):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_tempnet.models.attention import SDPAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=heads, num_query_groups=groups,
                            use_cpu_initialization=True, masked_softmax_fusion=False, attention_dropout=0.0)
    kw = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    s, b, d = 10, 3, 32 // heads
    q, k, v = torch.randn(s, b, heads, d), torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    ref = DotProductAttention(**kw)(q, k, v, mask, attn_mask_type=AttnMaskType.causal)
    out = SDPAttention(**kw)(q, k, v, mask, attn_mask_type=AttnMaskType.causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
