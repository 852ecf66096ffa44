"""megatron-core's tensor-parallel linear layers, with torch's own linear where there is nothing to parallelise.

With one tensor-parallel rank, no sequence parallelism, no fused weight-gradient accumulation and no deferred
weight gradient, megatron-core's LinearWithGradAccumulationAndAsyncCommunication computes exactly x W^T + b,
but as a Python autograd Function (autocast decorators, reshapes for the weight gradient, flag checks).
torch.nn.functional.linear computes the same with C++ autograd. On a CPU, where a small model's step is bound
by per-op overhead, that is about a tenth of the step (benchmarks/train_throughput.py). Everything else
(parameters, initialisation, sharded checkpoints, every TP > 1 path) stays megatron-core's.
"""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.utils import get_pg_size


class _PlainLinearWhenUnsharded:
    """Mixin over megatron-core's ColumnParallelLinear / RowParallelLinear."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._unsharded = get_pg_size(self.tp_group) == 1

    def _forward_impl(self, input, weight, bias=None, **flags):
        # These flags are what megatron-core's linear Function does beyond x W^T + b.
        if self._unsharded and not (flags.get("gradient_accumulation_fusion") or flags.get("allreduce_dgrad")
                                    or flags.get("sequence_parallel") or flags.get("grad_output_buffer") is not None):
            return F.linear(input, weight, bias)
        return super()._forward_impl(input, weight, bias=bias, **flags)


class ColumnParallelLinear(_PlainLinearWhenUnsharded, tensor_parallel.ColumnParallelLinear):
    pass


class RowParallelLinear(_PlainLinearWhenUnsharded, tensor_parallel.RowParallelLinear):
    pass
