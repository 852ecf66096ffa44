"""megatron-core's tensor-parallel linear layers, with torch's own linear where there is nothing to parallelise.

With one tensor-parallel rank, no sequence parallelism, no fused weight-gradient accumulation and no deferred
weight gradient, megatron-core's LinearWithGradAccumulationAndAsyncCommunication computes exactly x W^T + b,
but as a Python autograd Function (autocast decorators, reshapes for the weight gradient, flag checks).
torch.nn.functional.linear computes the same with C++ autograd. On a CPU, where a small model's step is bound
by per-op overhead, that is about a tenth of the step (benchmarks/train_throughput.py). Everything else
(parameters, initialisation, sharded checkpoints, every TP > 1 path) stays megatron-core's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.utils import get_pg_size


def _plain_suffices(layer, gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False,
                    grad_output_buffer=None, **_unused) -> bool:
    """True when megatron-core's linear Function would compute nothing but x W^T + b: these flags are what it
    does beyond that."""
    return (get_pg_size(layer.tp_group) == 1 and not gradient_accumulation_fusion and not allreduce_dgrad
            and not sequence_parallel and grad_output_buffer is None)


class _PlainLinearWhenUnsharded:
    """Mixin over megatron-core's ColumnParallelLinear / RowParallelLinear."""

    def _forward_impl(self, input, weight, bias=None, **flags):
        if _plain_suffices(self, **flags):
            return F.linear(input, weight, bias)
        return super()._forward_impl(input, weight, bias=bias, **flags)


class ColumnParallelLinear(_PlainLinearWhenUnsharded, tensor_parallel.ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear (linear_qkv, linear_fc1 in the local spec)."""


class RowParallelLinear(_PlainLinearWhenUnsharded, tensor_parallel.RowParallelLinear):
    """megatron-core's RowParallelLinear (linear_proj, linear_fc2 in the local spec)."""


def output_logits(layer: tensor_parallel.ColumnParallelLinear, hidden: torch.Tensor,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[s, b, V/TP] logits of megatron-core's output layer (which GPTModel builds itself, outside any spec),
    with torch's linear where that suffices. hidden: [s, b, D]; weight: the shared embedding, if tied."""
    weight = layer.weight if weight is None else weight
    deferred_wgrad = layer.grad_output_buffer if layer.config.defer_embedding_wgrad_compute else None
    if _plain_suffices(layer, gradient_accumulation_fusion=layer.gradient_accumulation_fusion,
                       grad_output_buffer=deferred_wgrad):  # one rank: no all-reduce, no sequence parallelism
        return F.linear(hidden, weight)
    return layer(hidden, weight=weight)[0]
