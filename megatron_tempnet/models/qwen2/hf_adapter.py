"""Qwen2 <-> Hugging Face Qwen2ForCausalLM: LLaMA's mapping (models/llama/hf_adapter.py) plus the QKV biases,
q_proj / k_proj / v_proj .bias, split from and merged into megatron-core's grouped linear_qkv.bias like the
weights. The embedding is tied to the output layer or not as the model is configured, and a tied Qwen2 comes
back tied (tie_word_embeddings both ways). Qwen2's config has no head_dim (always hidden / heads) and no
attention_bias (always on); its sliding-window attention we do not have."""
from __future__ import annotations

from typing import Dict

import torch

from ...config import ModelConfig
from ..hf_mapping import merge_qkv, split_qkv
from ..llama.hf_adapter import LlamaHFAdapter

Tensors = Dict[str, torch.Tensor]
_HF_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias")


class Qwen2HFAdapter(LlamaHFAdapter):
    """Converts one Qwen2 (`m`) to and from Qwen2ForCausalLM."""

    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    label = "Qwen2"
    arch = "qwen2"

    def to_hf_config(self, special_ids: Dict[str, int]) -> dict:
        kwargs = super().to_hf_config(special_ids)
        for name in ("head_dim", "attention_bias", "mlp_bias"):  # (not Qwen2Config's)
            del kwargs[name]
        return dict(kwargs, use_sliding_window=False)

    @classmethod
    def hf_config_problems(cls, hf_cfg: dict) -> list:
        problems = super().hf_config_problems(hf_cfg)
        layer_types = set(hf_cfg.get("layer_types") or ["full_attention"])
        if hf_cfg.get("use_sliding_window") or layer_types != {"full_attention"}:
            problems.append("sliding-window attention (use_sliding_window=true)")
        return problems

    @classmethod
    def from_hf_config(cls, hf_cfg: dict, where: str) -> ModelConfig:
        m = super().from_hf_config(hf_cfg, where)
        m.untie_embeddings_and_output_weights = False if hf_cfg.get("tie_word_embeddings") else None
        return m

    def to_hf(self, sd: Tensors) -> Tensors:
        out = super().to_hf(sd)
        for i in range(self.m.num_layers):
            qkv = split_qkv(sd[f"decoder.layers.{i}.self_attention.linear_qkv.bias"].detach().clone(), self.m)
            out.update({f"model.layers.{i}.self_attn.{name}": t for name, t in zip(_HF_BIASES, qkv)})
        return out

    def from_hf(self, hf: Tensors, *, tie_word_embeddings: bool) -> Tensors:
        sd = super().from_hf(hf, tie_word_embeddings=tie_word_embeddings)
        for i in range(self.m.num_layers):
            q, k, v = (hf[f"model.layers.{i}.self_attn.{name}"] for name in _HF_BIASES)
            sd[f"decoder.layers.{i}.self_attention.linear_qkv.bias"] = merge_qkv(q, k, v, self.m).float().contiguous()
        return sd
