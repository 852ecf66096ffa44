"""What a model family is, and the sizes a model of it has.

A family (models/<name>/__init__.py, registered in models/registry.py) states its architecture as a few
traits: the norm, the MLP's activation and gating, where it has biases, how it encodes positions and whether
its output layer shares the input embedding's weight. From these and a ModelConfig it gives megatron-core's
TransformerConfig and GPTModel arguments, the derived sizes (ModelDims), its parameter count and its
training FLOPs per token. Nothing outside the registry asks which family a config names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..config import ModelConfig


@dataclass(frozen=True)
class ModelDims:
    """The sizes of one model, derived once from its ModelConfig (models/registry.model_dims)."""

    num_layers: int
    hidden_size: int  # width of the residual stream
    seq_length: int  # tokens per training sample
    vocab_size: Optional[int]  # true vocabulary; None until the tokenizer gives it
    padded_vocab_size: Optional[int]  # vocab_size rounded up to make_vocab_size_divisible_by (independent of TP)
    ffn_hidden_size: int  # width of the MLP
    num_query_groups: int  # key/value heads
    kv_channels: int  # width of one attention head
    kv_hidden_size: int  # num_query_groups x kv_channels: the width of K (and of V)
    max_position_embeddings: int  # the longest sequence the model supports
    position_embeddings: Optional[int]  # rows of the learned position table; None: positions are rotary
    tied_embeddings: bool  # the output layer reuses the input embedding's weight


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    """Vocabulary padded to a multiple of `multiple` (independent of TP on purpose: checkpoints reshard)."""
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True)
class ModelFamily:
    """One architecture, as traits; see the module docstring.

    normalization: megatron-core's name of the norm ("LayerNorm" or "RMSNorm"), for TransformerConfig and the
    local layer spec. activation: the MLP's activation function (torch). gated_mlp: SwiGLU-style MLP (two input
    projections). linear_biases: biases on every linear layer; qkv_biases: on the QKV projection (implied by
    linear_biases). learned_positions: a learned absolute position table, else rotary (RoPE).
    tied_embeddings: the family's default for sharing the input embedding with the output layer
    (ModelConfig.untie_embeddings_and_output_weights overrides it). default_ffn_hidden_size: hidden -> MLP width
    when --ffn-hidden-size is unset. hf: the family's Hugging Face adapter (hf/), None where there is none.
    """

    name: str
    normalization: str
    activation: Callable
    gated_mlp: bool
    linear_biases: bool
    qkv_biases: bool
    learned_positions: bool
    tied_embeddings: bool
    default_ffn_hidden_size: Callable[[int], int]
    hf: Optional[Any] = None

    def dims(self, m: ModelConfig) -> ModelDims:
        groups = m.num_query_groups or m.num_attention_heads
        kv_channels = m.hidden_size // m.num_attention_heads
        positions = m.max_position_embeddings or m.seq_length
        untie = m.untie_embeddings_and_output_weights
        return ModelDims(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            seq_length=m.seq_length,
            vocab_size=m.vocab_size,
            padded_vocab_size=pad_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by) if m.vocab_size else None,
            ffn_hidden_size=(m.ffn_hidden_size if m.ffn_hidden_size is not None
                             else self.default_ffn_hidden_size(m.hidden_size)),
            num_query_groups=groups,
            kv_channels=kv_channels,
            kv_hidden_size=m.hidden_size * groups // m.num_attention_heads,
            max_position_embeddings=positions,
            position_embeddings=positions if self.learned_positions else None,
            tied_embeddings=self.tied_embeddings if untie is None else not untie,
        )

    def transformer_kwargs(self, dims: ModelDims) -> dict:
        """The megatron-core TransformerConfig fields that make a block of this family."""
        return dict(
            normalization=self.normalization,
            activation_func=self.activation,
            gated_linear_unit=self.gated_mlp,
            add_bias_linear=self.linear_biases,
            add_qkv_bias=self.qkv_biases or self.linear_biases,
            ffn_hidden_size=dims.ffn_hidden_size,
            num_query_groups=dims.num_query_groups,
            kv_channels=dims.kv_channels,
        )

    def model_kwargs(self, m: ModelConfig, dims: ModelDims) -> dict:
        """The megatron-core GPTModel arguments of this family (besides the shared ones)."""
        positions = (dict(position_embedding_type="learned_absolute") if self.learned_positions
                     else dict(position_embedding_type="rope", rotary_base=m.rotary_base))
        return dict(share_embeddings_and_output_weights=dims.tied_embeddings, **positions)

    def parameter_count(self, dims: ModelDims) -> int:
        """Parameters of the language model (all ranks together, TempNet not included), from its sizes."""
        h, kv, ffn, vp = dims.hidden_size, dims.kv_hidden_size, dims.ffn_hidden_size, dims.padded_vocab_size
        norm = 2 * h if self.normalization == "LayerNorm" else h  # weight (and LayerNorm's bias)
        per_layer = 2 * h * h + 2 * h * kv + (3 if self.gated_mlp else 2) * h * ffn + 2 * norm  # q, o, k, v, MLP
        if self.qkv_biases or self.linear_biases:
            per_layer += h + 2 * kv
        if self.linear_biases:  # output projection, MLP in (one per gate) and out
            per_layer += h + (2 if self.gated_mlp else 1) * ffn + h
        outside = vp * h * (1 if dims.tied_embeddings else 2) + norm  # embedding (+ output layer), final norm
        if dims.position_embeddings is not None:
            outside += dims.position_embeddings * h
        return dims.num_layers * per_layer + outside

    def flops_per_token(self, dims: ModelDims) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 x (dense parameters) for the matmuls
        plus 12 x layers x hidden x seq for attention scores and values (the PaLM formula)."""
        h, L, s = dims.hidden_size, dims.num_layers, dims.seq_length
        mlp = (3 if self.gated_mlp else 2) * h * dims.ffn_hidden_size
        per_layer = h * h * 2 + 2 * h * dims.kv_hidden_size + mlp  # q, o, k, v, MLP
        return 6 * (L * per_layer + h * dims.padded_vocab_size) + 12 * L * h * s
