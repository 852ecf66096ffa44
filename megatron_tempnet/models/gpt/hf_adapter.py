"""GPT <-> Hugging Face GPT2LMHeadModel: the config and the full (unsharded) state dict, both ways.

Our state dicts here are those of the TP = PP = 1 model built with the local spec (module keys such as
decoder.layers.0.self_attention.linear_qkv.weight); hf/ reads them from a checkpoint saved at any layout.
- attention: linear_qkv (grouped per head, models/hf_mapping.py) <-> c_attn = [q; k; v] (all query heads,
  then all keys, then all values); biases alike.
- GPT-2's c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj are Conv1D: their weights are ours transposed, [in, out].
- norms: input_layernorm, pre_mlp_layernorm, decoder.final_layernorm <-> ln_1, ln_2, ln_f (weights and biases).
- learned positions: embedding.position_embeddings <-> transformer.wpe.
- output layer: the embedding (tied, GPT-2's way), or with --untie-embeddings-and-output-weights output_layer
  <-> lm_head (tie_word_embeddings false).
- activation: megatron's F.gelu is the exact (erf) GeLU -> activation_function "gelu" (not GPT-2's usual
  "gelu_new", the tanh approximation, which our GPT does not have: such folders are refused on import).
- vocabulary: ours is padded to a multiple of make_vocab_size_divisible_by; Hugging Face gets the true
  vocabulary (rows beyond it are dropped, and are zeros when importing).
"""
from __future__ import annotations

from typing import Dict

import torch

from ...config import ModelConfig
from ..hf_mapping import HFAdapter, merge_qkv, pad_rows, split_qkv

Tensors = Dict[str, torch.Tensor]
# (ours, GPT-2's) linears after the attention's QKV, whose GPT-2 weights are Conv1D's (transposed)
_CONV1D = (("self_attention.linear_proj", "attn.c_proj"), ("mlp.linear_fc1", "mlp.c_fc"),
           ("mlp.linear_fc2", "mlp.c_proj"))
_NORMS = (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2"))


class GPTHFAdapter(HFAdapter):
    """Converts one GPT (`m`) to and from GPT2LMHeadModel."""

    model_type = "gpt2"  # config.json's
    architecture = "GPT2LMHeadModel"  # the transformers class
    label = "GPT-2"  # how messages name it
    arch = "gpt"  # our --arch of the models it converts

    def to_hf_config(self, special_ids: Dict[str, int]) -> dict:
        m = self.m
        return dict(
            vocab_size=m.vocab_size, n_positions=m.max_position_embeddings or m.seq_length, n_embd=m.hidden_size,
            n_layer=m.num_layers, n_head=m.num_attention_heads, n_inner=self.dims.ffn_hidden_size,
            activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=m.norm_epsilon, initializer_range=m.init_method_std, scale_attn_weights=True,
            tie_word_embeddings=self.dims.tied_embeddings, bos_token_id=special_ids.get("bos"),
            eos_token_id=special_ids.get("eos"), pad_token_id=special_ids.get("pad"), architectures=[self.architecture],
            dtype="float32")

    @classmethod
    def hf_config_problems(cls, hf_cfg: dict) -> list:
        problems = []
        act = hf_cfg.get("activation_function", "gelu_new")
        if act != "gelu":
            problems.append(f"activation {act!r} (ours is the exact GeLU, 'gelu')")
        if not hf_cfg.get("scale_attn_weights", True) or hf_cfg.get("scale_attn_by_inverse_layer_idx"):
            problems.append("attention scores not scaled by 1/sqrt(head size)")
        if hf_cfg.get("add_cross_attention"):
            problems.append("cross-attention")
        if hf_cfg["n_embd"] % hf_cfg["n_head"]:
            problems.append(f"n_embd {hf_cfg['n_embd']} not a multiple of n_head {hf_cfg['n_head']}")
        return problems

    @classmethod
    def model_config(cls, hf_cfg: dict) -> ModelConfig:
        positions = hf_cfg.get("n_positions", 1024)
        return ModelConfig(
            arch=cls.arch, num_layers=hf_cfg["n_layer"], hidden_size=hf_cfg["n_embd"],
            num_attention_heads=hf_cfg["n_head"], ffn_hidden_size=hf_cfg.get("n_inner") or 4 * hf_cfg["n_embd"],
            seq_length=positions, max_position_embeddings=positions, vocab_size=hf_cfg["vocab_size"],
            norm_epsilon=float(hf_cfg.get("layer_norm_epsilon", 1e-5)),
            init_method_std=float(hf_cfg.get("initializer_range", 0.02)), transformer_impl="local",
            untie_embeddings_and_output_weights=None if hf_cfg.get("tie_word_embeddings", True) else True)

    def to_hf(self, sd: Tensors) -> Tensors:
        m, V = self.m, self.m.vocab_size
        get = lambda k: sd[k].detach().clone()  # noqa: E731
        out = {"transformer.wte.weight": get("embedding.word_embeddings.weight")[:V],
               "transformer.wpe.weight": get("embedding.position_embeddings.weight")}
        for i in range(m.num_layers):
            src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
            for ours, theirs in _NORMS:
                out[dst + theirs + ".weight"] = get(src + ours + ".weight")
                out[dst + theirs + ".bias"] = get(src + ours + ".bias")
            q, k, v = split_qkv(get(src + "self_attention.linear_qkv.weight"), m)
            out[dst + "attn.c_attn.weight"] = torch.cat([q, k, v]).t().contiguous()
            out[dst + "attn.c_attn.bias"] = torch.cat(split_qkv(get(src + "self_attention.linear_qkv.bias"), m))
            for ours, theirs in _CONV1D:
                out[dst + theirs + ".weight"] = get(src + ours + ".weight").t().contiguous()
                out[dst + theirs + ".bias"] = get(src + ours + ".bias")
        out["transformer.ln_f.weight"] = get("decoder.final_layernorm.weight")
        out["transformer.ln_f.bias"] = get("decoder.final_layernorm.bias")
        out["lm_head.weight"] = out["transformer.wte.weight"] if self.dims.tied_embeddings else \
            get("output_layer.weight")[:V]
        return out

    def from_hf(self, hf: Tensors, *, tie_word_embeddings: bool = True) -> Tensors:
        """A Hugging Face GPT-2 state dict -> our full state dict (fp32; the vocabulary padded with zero rows).
        Whether the output layer is the embedding is our model's setting (from_hf_config reads it from the
        Hugging Face config), so `tie_word_embeddings` is unused."""
        m, h, Vp = self.m, self.m.hidden_size, self.dims.padded_vocab_size
        sd = {"embedding.word_embeddings.weight": pad_rows(hf["transformer.wte.weight"], Vp),
              "embedding.position_embeddings.weight": hf["transformer.wpe.weight"]}
        for i in range(m.num_layers):
            src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
            for ours, theirs in _NORMS:
                sd[dst + ours + ".weight"] = hf[src + theirs + ".weight"]
                sd[dst + ours + ".bias"] = hf[src + theirs + ".bias"]
            qkv_w = hf[src + "attn.c_attn.weight"].t()  # [3h, h]: all q, all k, all v
            sd[dst + "self_attention.linear_qkv.weight"] = merge_qkv(*qkv_w.split(h), m)
            sd[dst + "self_attention.linear_qkv.bias"] = merge_qkv(*hf[src + "attn.c_attn.bias"].split(h), m)
            for ours, theirs in _CONV1D:
                sd[dst + ours + ".weight"] = hf[src + theirs + ".weight"].t()
                sd[dst + ours + ".bias"] = hf[src + theirs + ".bias"]
        sd["decoder.final_layernorm.weight"] = hf["transformer.ln_f.weight"]
        sd["decoder.final_layernorm.bias"] = hf["transformer.ln_f.bias"]
        if not self.dims.tied_embeddings:
            sd["output_layer.weight"] = pad_rows(hf["lm_head.weight"], Vp)
        return {k: v.float().contiguous() for k, v in sd.items()}
