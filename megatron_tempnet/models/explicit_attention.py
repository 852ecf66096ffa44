"""Attention transfer for language models (Li et al. 2024, "On the Surprising Effectiveness of Attention
Transfer for Vision Transformers"): a student GPT/LLaMA learns from a frozen teacher's attention maps.

`--attention-transfer-mode`:
  copy     every student layer uses the teacher's attention probabilities of the same layer in place of its
           own: out = P_teacher @ V_student. The student learns its values, output projections, MLPs, norms
           and embeddings. Its query/key projections are computed but unused, so they receive no gradient
           (only weight decay moves them); the student cannot run without the teacher.
  distill  every student layer computes its own attention P_student, and the objective becomes
               LM loss + w * mean over layers l, heads h and (loss-masked) query tokens t of
                   KL(P_teacher[l, h, t, :] || P_student[l, h, t, :])
           (w = --attention-transfer-distill-weight). The KL is zero when the student is the teacher. The
           trained student is an ordinary model: load it with --attention-transfer-mode none.

This file holds the model side: `ExplicitAttention`, the core attention that the layer spec uses in place of
SDPAttention when attention transfer is on (models/specs.py). It forms softmax(QK^T / sqrt(d)) with the
causal mask explicitly, so it can record the probabilities (teacher), use supplied ones (copy), or add the KL
term (distill). The training side (training/attention_transfer.py) builds the teacher, runs it on every
micro-batch and hands each student layer the teacher probabilities of the same global layer number.

The distillation term is backpropagated on the pipeline stage that computes it, the way megatron-core
backpropagates MoE auxiliary losses: an identity function on the layer's output gives the term the
gradient of the LM loss's scale in backward. With calculate_per_token_loss, megatron-core divides every
gradient by the global batch's token count, so each layer contributes
    w / (layers * heads) * sum over its heads and masked tokens of KL
and the objective is per token, at any TP/PP/DP layout and number of micro-batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

ROLES = ("teacher", "copy", "distill")


@dataclass
class TransferContext:
    """Shared by the ExplicitAttention modules of one model chunk; set per micro-batch by the trainer.

    role: "teacher" (record this chunk's probabilities into `recorded`), "copy" or "distill" (read the
    teacher's from `supplied`). Keys of `supplied` / `recorded` / `applied` are global layer numbers (1-based).
    """

    role: str
    num_layers: int  # the whole model's, for the normalisation of the distillation term
    num_heads: int
    distill_weight: float = 0.0
    record_dtype: torch.dtype = torch.float32
    supplied: Optional[Dict[int, torch.Tensor]] = None  # teacher probabilities of the current micro-batch
    query_mask: Optional[torch.Tensor] = None  # [b, s] loss mask: which query tokens the KL counts
    loss_scale: Optional[torch.Tensor] = None  # the LM loss's backward scale (mixed-precision loss scaling)
    recorded: Dict[int, torch.Tensor] = field(default_factory=dict)
    record_applied: bool = False  # keep the probabilities each layer applied (inspection, tests)
    applied: Dict[int, torch.Tensor] = field(default_factory=dict)
    kl_sum: Optional[torch.Tensor] = None  # running sum over layers, local heads and masked tokens (detached)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}; got {self.role!r}")

    def take(self, layer_number: int) -> Optional[torch.Tensor]:
        if self.supplied is None:
            return None
        if layer_number not in self.supplied:
            raise RuntimeError(
                f"attention transfer: no teacher attention for layer {layer_number} in this micro-batch "
                f"(have layers {sorted(self.supplied)}); the teacher and the student must share the layer layout")
        return self.supplied.pop(layer_number)

    def add_kl(self, value: torch.Tensor) -> None:
        value = value.detach().double()
        self.kl_sum = value if self.kl_sum is None else self.kl_sum + value


class _AuxLossGrad(torch.autograd.Function):
    """Identity on `output`; in backward gives `aux_loss` the gradient `scale` (megatron-core's
    MoEAuxLossAutoScaler trick), so a per-layer loss is backpropagated on its own pipeline stage."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss, scale)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        aux_loss, scale = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * scale.to(aux_loss.dtype).reshape(()), None


def attention_kl(teacher_probs: torch.Tensor, student_log_probs: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per query row: [b, h, sq, sk] -> [b, h, sq] (fp32). `masked` (True = masked)
    marks entries both distributions give probability zero."""
    pt = teacher_probs.float()
    log_ps = student_log_probs.float().masked_fill(masked, 0.0)
    return (torch.xlogy(pt, pt) - pt * log_ps).sum(-1)


class ExplicitAttention(MegatronModule):
    """Core attention with explicit probabilities: softmax(Q K^T * scale + causal mask) @ V.

    Same interface, parameters (none) and math as SDPAttention / megatron-core's DotProductAttention, so
    checkpoints are interchangeable. Without a TransferContext (or with one whose `supplied` is None in
    distill role) it is plain attention. Scores and softmax are in fp32; the probabilities multiply V in
    V's dtype. Grouped-query attention repeats each key/value group over its query heads (megatron-core's
    order). query: [sq, b, heads, d]; key, value: [sk, b, groups, d] -> [sq, b, heads * d].
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, softmax_scale: Optional[float] = None, **_unused):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("ExplicitAttention does not implement context parallelism")
        self.layer_number = layer_number  # global (megatron-core adds the pipeline offset)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.context: Optional[TransferContext] = None  # set by training/attention_transfer.py
        self._causal_cache: Dict[tuple, torch.Tensor] = {}

    def _masked(self, attention_mask, mask_type, sq: int, sk: int, device) -> Optional[torch.Tensor]:
        if mask_type == AttnMaskType.causal:
            key = (sq, sk, device)
            if key not in self._causal_cache:
                self._causal_cache = {key: torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1 + sk - sq)}
            return self._causal_cache[key]
        return attention_mask  # megatron-core: True = masked; None = attend everywhere

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("ExplicitAttention supports neither attention_bias nor packed sequences")
        sq, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if k.size(1) != q.size(1):
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        masked = self._masked(attention_mask, attn_mask_type or self.attn_mask_type, q.size(2), k.size(2), q.device)
        ctx = self.context
        role = ctx.role if ctx is not None else None
        teacher = ctx.take(self.layer_number) if role in ("copy", "distill") else None
        aux = None
        if role == "copy":
            if teacher is None:
                raise RuntimeError(
                    "attention copy: the student's layers need the teacher's attention, and none was supplied; "
                    "run the model through training/step.py (forward_step supplies it), or load its weights with "
                    "--attention-transfer-mode none (a copy-mode student is not a standalone model)")
            probs = teacher.to(v.dtype)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale
            if masked is not None:
                scores = scores.masked_fill(masked, float("-inf"))
            if teacher is not None:  # distill
                log_probs = torch.log_softmax(scores, dim=-1)
                probs = log_probs.exp()
                kl = attention_kl(teacher, log_probs, masked if masked is not None else torch.zeros((), dtype=torch.bool, device=q.device))
                kl = kl.sum(1)  # [b, sq]: summed over this rank's heads
                if ctx.query_mask is not None:
                    kl = kl * ctx.query_mask.to(kl.dtype)
                kl_sum = kl.sum()
                ctx.add_kl(kl_sum)
                if torch.is_grad_enabled() and ctx.distill_weight > 0:
                    aux = kl_sum * (ctx.distill_weight / (ctx.num_layers * ctx.num_heads))
            else:
                probs = torch.softmax(scores, dim=-1)
            if role == "teacher":
                ctx.recorded[self.layer_number] = probs.detach().to(ctx.record_dtype)
            probs = probs.to(v.dtype)
        if ctx is not None and ctx.record_applied:
            ctx.applied[self.layer_number] = probs.detach()
        if self.training and self.dropout > 0:
            probs = F.dropout(probs, p=self.dropout)
        out = torch.matmul(probs, v).permute(2, 0, 1, 3).reshape(sq, b, -1)
        if aux is not None:
            scale = ctx.loss_scale if ctx.loss_scale is not None else torch.ones((), device=out.device)
            out = _AuxLossGrad.apply(out, aux, scale)
        return out
