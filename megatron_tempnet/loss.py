"""The DRO loss on vocabulary-parallel logits (docs/design.md, "The DRO loss").

Per token with logits z over the true vocabulary V, target y, temperature tau and radius rho:

    L        = tau * (logsumexp(z / tau) - z_y / tau) + tau * (rho - log V)
    dL/dz_k  = softmax(z / tau)_k - [k = y]
    dL/dtau  = rho - KL(softmax(z / tau) || uniform(V))

tau = 1 with rho = log V is plain cross-entropy, so the no-TempNet baseline runs this same code.

`dro_loss` is the reference: it takes materialised logits (each tensor-parallel rank holds its contiguous
vocabulary shard) and uses megatron-core's vocab_parallel_cross_entropy for the tau-scaled cross-entropy
(torch's own at TP = 1).
`linear_dro_loss` is the same loss from the final hidden states and the output weight through the fused
kernel (tempnet_kernels.dro_cce: Triton on GPUs, chunked torch elsewhere), which never materialises the
logits. `--loss-impl` chooses; `resolve_loss_impl` says which wins where.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel


def default_rho(vocab_size: int) -> float:
    """rho = log V: with tau = 1 the DRO loss is exactly cross-entropy."""
    return math.log(vocab_size)


def _mask_padded_vocab(z_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padded vocabulary entries (global index >= V) get -inf: they take no probability mass."""
    local = z_shard.size(-1)
    start = parallel_state.get_tensor_model_parallel_rank() * local
    valid = vocab_size - start
    if valid >= local:
        return z_shard
    pad = torch.arange(local, device=z_shard.device) >= valid
    return z_shard.masked_fill(pad, float("-inf"))


def _cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross-entropy [...] over the true vocabulary from vocabulary-parallel logits [..., V/TP].

    One TP rank: torch's fused cross_entropy on the true-vocabulary slice (the padding simply left out), one
    kernel where megatron-core's vocab_parallel_cross_entropy issues a dozen ops. Else megatron-core's, with
    the padding masked to -inf."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        z = logits_shard[..., :vocab_size].reshape(-1, vocab_size)
        return F.cross_entropy(z, targets.reshape(-1), reduction="none").view(targets.shape)
    return tensor_parallel.vocab_parallel_cross_entropy(_mask_padded_vocab(logits_shard, vocab_size), targets)


def dro_loss(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    tau: Optional[torch.Tensor],
    rho: float,
    vocab_size: int,
) -> torch.Tensor:
    """Per-token DRO loss from vocabulary-parallel logits (reference implementation).

    logits_shard: [..., V/TP] this rank's logits; targets: [...] global token ids; tau: [...] (None = 1);
    rho: DRO radius (nats); vocab_size: true V. Returns [...] fp32. The gradient reaches logits and tau;
    dL/dtau is the full (all-vocabulary) value on every TP rank.
    """
    z = logits_shard.float()
    if tau is None:
        ce = _cross_entropy(z, targets, vocab_size)
        return ce + (rho - math.log(vocab_size))
    tau = tau.float()
    # Each rank's z/tau sees only its shard, so its contribution to dL/dtau is partial: the copy sums them.
    tau_for_scale = tau
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        tau_for_scale = tensor_parallel.copy_to_tensor_model_parallel_region(tau)
    # Padding is left out after scaling: its -inf must not meet tau's gradient (0 * inf).
    ce = _cross_entropy(z / tau_for_scale.unsqueeze(-1), targets, vocab_size)
    return tau * ce + tau * (rho - math.log(vocab_size))


def linear_dro_loss(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    tau: Optional[torch.Tensor],
    rho: float,
    vocab_size: int,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Per-token DRO loss from final hidden states, without materialising the logits (fused kernel).

    hidden: [s, b, D] (or [s/TP, b, D] under sequence parallelism); output_weight: [V/TP, D] this rank's rows
    of the output layer; targets, tau: [s, b] (tau None = 1). Returns [s, b] fp32. Gradients reach hidden
    (all-reduced over TP, as megatron-core's ColumnParallelLinear does), the output weight and tau.
    """
    from tempnet_kernels.dro_cce import linear_dro_cross_entropy

    group = parallel_state.get_tensor_model_parallel_group()
    if sequence_parallel:  # gather the sequence; the backward reduce-scatters the partial dE
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    else:  # the backward sums the partial dE of every vocabulary shard
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    if tau is None:
        tau = torch.ones(targets.shape, dtype=torch.float32, device=hidden.device)
    start = parallel_state.get_tensor_model_parallel_rank() * output_weight.size(0)
    return linear_dro_cross_entropy(hidden, output_weight, targets, tau, rho, vocab_size,
                                    vocab_start_index=start, tp_group=group)


# Vocabulary shard size from which the chunked torch kernel beats materialised logits on a CPU
# (benchmarks/loss_kernel.py: 32000 x 512 at 8192 tokens: 18.6 s vs 27.5 s; 8192 x 256: 3.8 s vs 1.8 s).
FUSED_WINS_ON_CPU_FROM_VOCAB_SHARD = 16384


def resolve_loss_impl(requested: str, padded_vocab_size: int, tp_size: int, cuda: bool) -> str:
    """'auto' -> 'fused' on GPUs (Triton) and on CPUs for large vocabulary shards, else 'reference'."""
    if requested != "auto":
        return requested
    return "fused" if cuda or padded_vocab_size // tp_size >= FUSED_WINS_ON_CPU_FROM_VOCAB_SHARD else "reference"
