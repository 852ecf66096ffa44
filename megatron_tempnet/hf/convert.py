"""Weight and config mapping between our models (megatron-core, TP = PP = 1) and Hugging Face transformers.

GPT  <-> GPT2LMHeadModel, LLaMA <-> LlamaForCausalLM (our LLaMA from Hugging Face: LLaMA only); with TempNet
their subclasses in modeling_tempnet.py, TempNet's tensors under "tempnet." and its config in config.json.

megatron-core layouts (local spec, TP = 1), and what they become:
- attention `linear_qkv.weight` [G * (n + 2) * hd, h] is grouped per key/value group g: the n query heads
  of g, then k_g, then v_g (n = heads / groups). LLaMA: q_proj / k_proj / v_proj; GPT-2: c_attn = [q; k; v]
  (all query heads, then all keys, then all values), as Conv1D, i.e. transposed [h, 3h]; biases alike.
- SwiGLU `linear_fc1.weight` = [gate; up] (megatron's glu: act(first half) * second half) -> gate_proj,
  up_proj. GPT-2's c_fc / c_proj / attn.c_proj are Conv1D: transposed.
- layer norms are modules of their own in the local spec (input_layernorm, pre_mlp_layernorm,
  decoder.final_layernorm) -> ln_1 / ln_2 / ln_f (GPT-2), input_layernorm / post_attention_layernorm /
  model.norm (LLaMA).
- rotary embedding: megatron-core's default (rotary_interleaved=False) rotates halves, like HF LLaMA
  (rotate_half); inv_freq = base^(-2i/d) in both. tests/test_hf_convert.py checks the logits agree.
- vocabulary: ours is padded to a multiple of make_vocab_size_divisible_by (TP-independent); Hugging Face
  gets the true vocabulary (rows, and TempNet's W1 columns, beyond it are dropped; zeros when importing).
- GPT-2 activation: megatron's F.gelu is the exact (erf) GeLU -> activation_function "gelu" (not "gelu_new").
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..config import Config, ModelConfig
from ..models.registry import model_dims

SUPPORTED_TO_HF = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
SUPPORTED_FROM_HF = {"llama": "LlamaForCausalLM"}


class ConversionError(ValueError):
    """A model that cannot be converted. The message names the problem and the fix."""


def _dims(m: ModelConfig) -> Tuple[int, int, int, int]:
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    return heads, groups, m.hidden_size // heads, heads // groups


# ------------------------------------------------------------------------------------------------------
# ours -> Hugging Face
# ------------------------------------------------------------------------------------------------------


def hf_config(cfg: Config, special_ids: Dict[str, int], tempnet: Optional[dict] = None):
    """transformers config for our model (true vocabulary, fp32); with `tempnet` (tempnet_to_hf's config) the
    TempNet model's config (configuration_tempnet.py), which carries it."""
    from .configuration_tempnet import TempNetGPT2Config, TempNetLlamaConfig

    m = cfg.model
    extra = {"tempnet": tempnet} if tempnet else {}  # (save_pretrained writes the architectures)
    heads, groups, hd, _ = _dims(m)
    positions = m.max_position_embeddings or m.seq_length
    bos, eos, pad = special_ids.get("bos"), special_ids.get("eos"), special_ids.get("pad")
    if m.arch == "gpt":
        from transformers import GPT2Config

        return (TempNetGPT2Config if tempnet else GPT2Config)(
            vocab_size=m.vocab_size, n_positions=positions, n_embd=m.hidden_size, n_layer=m.num_layers,
            n_head=heads, n_inner=model_dims(m).ffn_hidden_size, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, layer_norm_epsilon=m.norm_epsilon, initializer_range=m.init_method_std,
            scale_attn_weights=True, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=pad, architectures=["GPT2LMHeadModel"], dtype="float32", **extra)
    from transformers import LlamaConfig

    return (TempNetLlamaConfig if tempnet else LlamaConfig)(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=model_dims(m).ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=heads, num_key_value_heads=groups, head_dim=hd,
        hidden_act="silu", max_position_embeddings=positions, initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_epsilon, rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad, architectures=["LlamaForCausalLM"], dtype="float32", **extra)


def _split_qkv(w: torch.Tensor, m: ModelConfig):
    """linear_qkv weight [G*(n+2)*hd, ...] or bias -> (q [H*hd, ...], k [G*hd, ...], v [G*hd, ...])."""
    heads, groups, hd, n = _dims(m)
    rest = w.shape[1:]
    g = w.reshape(groups, n + 2, hd, *rest)
    q = g[:, :n].reshape(heads * hd, *rest)
    k = g[:, n].reshape(groups * hd, *rest)
    v = g[:, n + 1].reshape(groups * hd, *rest)
    return q, k, v


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    heads, groups, hd, n = _dims(m)
    rest = q.shape[1:]
    g = torch.cat([q.reshape(groups, n, hd, *rest), k.reshape(groups, 1, hd, *rest), v.reshape(groups, 1, hd, *rest)],
                  dim=1)
    return g.reshape(groups * (n + 2) * hd, *rest)


def to_hf_state_dict(cfg: Config, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our TP = 1 model state dict (module keys, e.g. decoder.layers.0.self_attention.linear_qkv.weight)
    -> the Hugging Face model's state dict."""
    m = cfg.model
    V = m.vocab_size
    out: Dict[str, torch.Tensor] = {}
    get = lambda k: sd[k].detach().clone()  # noqa: E731
    if m.arch == "gpt":
        out["transformer.wte.weight"] = get("embedding.word_embeddings.weight")[:V]
        out["transformer.wpe.weight"] = get("embedding.position_embeddings.weight")
        for i in range(m.num_layers):
            src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
            for a, b in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                out[dst + b + ".weight"] = get(src + a + ".weight")
                out[dst + b + ".bias"] = get(src + a + ".bias")
            q, k, v = _split_qkv(get(src + "self_attention.linear_qkv.weight"), m)
            out[dst + "attn.c_attn.weight"] = torch.cat([q, k, v]).t().contiguous()
            out[dst + "attn.c_attn.bias"] = torch.cat(_split_qkv(get(src + "self_attention.linear_qkv.bias"), m))
            for a, b in (("self_attention.linear_proj", "attn.c_proj"), ("mlp.linear_fc1", "mlp.c_fc"),
                         ("mlp.linear_fc2", "mlp.c_proj")):
                out[dst + b + ".weight"] = get(src + a + ".weight").t().contiguous()
                out[dst + b + ".bias"] = get(src + a + ".bias")
        out["transformer.ln_f.weight"] = get("decoder.final_layernorm.weight")
        out["transformer.ln_f.bias"] = get("decoder.final_layernorm.bias")
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out
    out["model.embed_tokens.weight"] = get("embedding.word_embeddings.weight")[:V]
    ffn = model_dims(m).ffn_hidden_size
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = get(src + "pre_mlp_layernorm.weight")
        q, k, v = _split_qkv(get(src + "self_attention.linear_qkv.weight"), m)
        out[dst + "self_attn.q_proj.weight"], out[dst + "self_attn.k_proj.weight"] = q, k
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.o_proj.weight"] = get(src + "self_attention.linear_proj.weight")
        fc1 = get(src + "mlp.linear_fc1.weight")
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = fc1[:ffn].clone(), fc1[ffn:].clone()
        out[dst + "mlp.down_proj.weight"] = get(src + "mlp.linear_fc2.weight")
    out["model.norm.weight"] = get("decoder.final_layernorm.weight")
    out["lm_head.weight"] = get("output_layer.weight")[:V]
    return out


def tempnet_to_hf(cfg: Config, sd: Dict[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config.json's "tempnet" entry, TempNet's tensors without their "tempnet." prefix) from our model
    state dict."""
    t, V = cfg.tempnet, cfg.model.vocab_size
    kind = getattr(t, "kind", "network")
    config = {"kind": kind, "tau_min": t.tau_min, "tau_max": t.tau_max, "vocab_size": V,
              "hidden_size": t.hidden_size, "input_variant": t.input_variant,
              "scale_input": bool(getattr(t, "scale_input", False))}
    tensors = {k[len("tempnet."):]: v.detach().clone().contiguous() for k, v in sd.items()
               if k.startswith("tempnet.") and isinstance(v, torch.Tensor)}
    if "w1" in tensors:
        tensors["w1"] = tensors["w1"][:, :V].contiguous()
    return config, tensors


# ------------------------------------------------------------------------------------------------------
# Hugging Face -> ours (LLaMA)
# ------------------------------------------------------------------------------------------------------


def check_hf_config(hf_cfg: dict, where: str) -> None:
    """Refuse a Hugging Face model our LLaMA cannot represent exactly, naming what differs."""
    mtype = hf_cfg.get("model_type")
    archs = hf_cfg.get("architectures") or []
    if mtype not in SUPPORTED_FROM_HF:
        raise ConversionError(
            f"{where} holds a {'/'.join(archs) or mtype or 'model of unknown type'} (model_type {mtype!r}); only "
            f"LLaMA folders (model_type 'llama', LlamaForCausalLM) convert to our checkpoints. Convert the model "
            "to the LLaMA layout first, or train it here from scratch")
    problems = []
    rope = hf_cfg.get("rope_parameters") or hf_cfg.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} (only plain RoPE)")
    if hf_cfg.get("attention_bias"):
        problems.append("attention biases (attention_bias=true)")
    if hf_cfg.get("mlp_bias"):
        problems.append("MLP biases (mlp_bias=true)")
    if hf_cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {hf_cfg.get('hidden_act')!r} (only silu / SwiGLU)")
    heads, hidden = hf_cfg["num_attention_heads"], hf_cfg["hidden_size"]
    if hf_cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        problems.append(f"head_dim {hf_cfg.get('head_dim')} != hidden_size / num_attention_heads")
    theta = _rope_theta(hf_cfg)
    if theta != int(theta):
        problems.append(f"rope_theta {theta} is not an integer (our --rotary-base is)")
    if problems:
        raise ConversionError(f"{where}: this LLaMA uses {', '.join(problems)}, which our LLaMA does not have; "
                              "it cannot be converted exactly")


def _rope_theta(hf_cfg: dict) -> float:
    rope = hf_cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))


def model_config_from_hf(hf_cfg: dict) -> ModelConfig:
    heads = hf_cfg["num_attention_heads"]
    positions = hf_cfg.get("max_position_embeddings", 2048)
    m = ModelConfig(
        arch="llama", num_layers=hf_cfg["num_hidden_layers"], hidden_size=hf_cfg["hidden_size"],
        num_attention_heads=heads, num_query_groups=hf_cfg.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf_cfg["intermediate_size"], seq_length=positions, max_position_embeddings=positions,
        vocab_size=hf_cfg["vocab_size"], rotary_base=int(_rope_theta(hf_cfg)),
        norm_epsilon=float(hf_cfg.get("rms_norm_eps", 1e-6)), init_method_std=float(hf_cfg.get("initializer_range", 0.02)),
        transformer_impl="local")
    return m


def from_hf_state_dict(m: ModelConfig, hf: Dict[str, torch.Tensor], tie_word_embeddings: bool) -> Dict[str, torch.Tensor]:
    """A Hugging Face LLaMA state dict -> our TP = 1 model state dict (vocabulary padded with zeros)."""
    Vp = model_dims(m).padded_vocab_size

    def pad_rows(w):
        out = torch.zeros(Vp, *w.shape[1:], dtype=w.dtype)
        out[: w.shape[0]] = w
        return out

    sd = {"embedding.word_embeddings.weight": pad_rows(hf["model.embed_tokens.weight"])}
    for i in range(m.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        sd[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        sd[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        sd[dst + "self_attention.linear_qkv.weight"] = _merge_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"], hf[src + "self_attn.v_proj.weight"], m)
        sd[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        sd[dst + "mlp.linear_fc1.weight"] = torch.cat([hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]])
        sd[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    sd["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    head = hf["model.embed_tokens.weight"] if tie_word_embeddings or "lm_head.weight" not in hf else hf["lm_head.weight"]
    sd["output_layer.weight"] = pad_rows(head)
    return {k: v.float().contiguous() for k, v in sd.items()}


def tempnet_from_hf(config: dict, tensors: Dict[str, torch.Tensor], padded_vocab: int) -> Dict[str, torch.Tensor]:
    out = {f"tempnet.{k}": v.float() for k, v in tensors.items()}
    if "tempnet.w1" in out:
        w1 = torch.zeros(out["tempnet.w1"].shape[0], padded_vocab)
        w1[:, : out["tempnet.w1"].shape[1]] = out["tempnet.w1"]
        out["tempnet.w1"] = w1
    return out
