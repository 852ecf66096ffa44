"""LLaMA <-> Hugging Face LlamaForCausalLM: the config and the full (unsharded) state dict, both ways.

Our state dicts here are those of the TP = PP = 1 model built with the local spec (module keys such as
decoder.layers.0.self_attention.linear_qkv.weight); hf/ reads them from a checkpoint saved at any layout.
- attention: linear_qkv (grouped per key/value group, models/hf_mapping.py) <-> q_proj / k_proj / v_proj;
  linear_proj <-> o_proj.
- SwiGLU: linear_fc1 = [gate; up] (megatron's glu: act(first half) * second half) <-> gate_proj, up_proj;
  linear_fc2 <-> down_proj.
- norms (modules of their own in the local spec): input_layernorm, pre_mlp_layernorm, decoder.final_layernorm
  <-> input_layernorm, post_attention_layernorm, model.norm.
- rotary embedding: megatron-core's default (rotary_interleaved=False) rotates halves, like HF's rotate_half;
  inv_freq = base^(-2i/d) in both. tests/test_hf_convert.py checks the logits agree.
- output layer: output_layer <-> lm_head; a LLaMA with tied embeddings (--untie-embeddings-and-output-weights
  false) has none, and Hugging Face's tie_word_embeddings says so.
- vocabulary: ours is padded to a multiple of make_vocab_size_divisible_by; Hugging Face gets the true
  vocabulary (rows beyond it are dropped, and are zeros when importing).
"""
from __future__ import annotations

from typing import Dict

import torch

from ...config import ModelConfig
from ..hf_mapping import HFAdapter, attention_dims, merge_qkv, pad_rows, rope_problems, rope_theta, split_qkv

Tensors = Dict[str, torch.Tensor]


class LlamaHFAdapter(HFAdapter):
    """Converts one LLaMA (`m`) to and from LlamaForCausalLM."""

    model_type = "llama"  # config.json's
    architecture = "LlamaForCausalLM"  # the transformers class
    label = "LLaMA"  # how messages name it
    arch = "llama"  # our --arch of the models it converts

    def to_hf_config(self, special_ids: Dict[str, int]) -> dict:
        m = self.m
        heads, groups, hd, _ = attention_dims(m)
        return dict(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=self.dims.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=heads, num_key_value_heads=groups, head_dim=hd,
            hidden_act="silu", max_position_embeddings=m.max_position_embeddings or m.seq_length,
            initializer_range=m.init_method_std, rms_norm_eps=m.norm_epsilon,
            rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
            tie_word_embeddings=self.dims.tied_embeddings,
            attention_bias=False, mlp_bias=False, bos_token_id=special_ids.get("bos"),
            eos_token_id=special_ids.get("eos"), pad_token_id=special_ids.get("pad"),
            architectures=[self.architecture], dtype="float32")

    @classmethod
    def hf_config_problems(cls, hf_cfg: dict) -> list:
        problems = rope_problems(hf_cfg)
        if hf_cfg.get("attention_bias"):
            problems.append("attention biases (attention_bias=true)")
        if hf_cfg.get("mlp_bias"):
            problems.append("MLP biases (mlp_bias=true)")
        if hf_cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"activation {hf_cfg.get('hidden_act')!r} (only silu / SwiGLU)")
        heads, hidden = hf_cfg["num_attention_heads"], hf_cfg["hidden_size"]
        if hf_cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
            problems.append(f"head_dim {hf_cfg.get('head_dim')} != hidden_size / num_attention_heads")
        return problems

    @classmethod
    def model_config(cls, hf_cfg: dict) -> ModelConfig:
        heads = hf_cfg["num_attention_heads"]
        positions = hf_cfg.get("max_position_embeddings", 2048)
        return ModelConfig(
            arch=cls.arch, num_layers=hf_cfg["num_hidden_layers"], hidden_size=hf_cfg["hidden_size"],
            num_attention_heads=heads, num_query_groups=hf_cfg.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf_cfg["intermediate_size"], seq_length=positions, max_position_embeddings=positions,
            vocab_size=hf_cfg["vocab_size"], rotary_base=int(rope_theta(hf_cfg)),
            norm_epsilon=float(hf_cfg.get("rms_norm_eps", 1e-6)),
            init_method_std=float(hf_cfg.get("initializer_range", 0.02)), transformer_impl="local")

    def to_hf(self, sd: Tensors) -> Tensors:
        m, V, ffn = self.m, self.m.vocab_size, self.dims.ffn_hidden_size
        get = lambda k: sd[k].detach().clone()  # noqa: E731
        out = {"model.embed_tokens.weight": get("embedding.word_embeddings.weight")[:V]}
        for i in range(m.num_layers):
            src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
            out[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight")
            out[dst + "post_attention_layernorm.weight"] = get(src + "pre_mlp_layernorm.weight")
            q, k, v = split_qkv(get(src + "self_attention.linear_qkv.weight"), m)
            out[dst + "self_attn.q_proj.weight"], out[dst + "self_attn.k_proj.weight"] = q, k
            out[dst + "self_attn.v_proj.weight"] = v
            out[dst + "self_attn.o_proj.weight"] = get(src + "self_attention.linear_proj.weight")
            fc1 = get(src + "mlp.linear_fc1.weight")
            out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = fc1[:ffn].clone(), fc1[ffn:].clone()
            out[dst + "mlp.down_proj.weight"] = get(src + "mlp.linear_fc2.weight")
        out["model.norm.weight"] = get("decoder.final_layernorm.weight")
        out["lm_head.weight"] = out["model.embed_tokens.weight"] if self.dims.tied_embeddings else \
            get("output_layer.weight")[:V]
        return out

    def from_hf(self, hf: Tensors, *, tie_word_embeddings: bool) -> Tensors:
        """A Hugging Face state dict -> our full state dict (fp32; the vocabulary padded with zero rows). Into our
        untied model, a tied Hugging Face model (or one without lm_head) gives its embedding as the output layer."""
        m, Vp = self.m, self.dims.padded_vocab_size
        sd = {"embedding.word_embeddings.weight": pad_rows(hf["model.embed_tokens.weight"], Vp)}
        for i in range(m.num_layers):
            src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
            sd[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
            sd[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
            sd[dst + "self_attention.linear_qkv.weight"] = merge_qkv(
                hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
                hf[src + "self_attn.v_proj.weight"], m)
            sd[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
            sd[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"],
                                                           hf[src + "mlp.up_proj.weight"]])
            sd[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
        sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not self.dims.tied_embeddings:
            tied = tie_word_embeddings or "lm_head.weight" not in hf
            sd["output_layer.weight"] = pad_rows(hf["model.embed_tokens.weight" if tied else "lm_head.weight"], Vp)
        return {k: v.float().contiguous() for k, v in sd.items()}
