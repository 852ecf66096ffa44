"""The DRO loss on vocabulary-parallel logits (DESIGN.md, "The DRO loss").

Per token with logits z over the true vocabulary V, target y, temperature tau and radius rho:

    L        = tau * (logsumexp(z / tau) - z_y / tau) + tau * (rho - log V)
    dL/dz_k  = softmax(z / tau)_k - [k = y]
    dL/dtau  = rho - KL(softmax(z / tau) || uniform(V))

tau = 1 with rho = log V is plain cross-entropy, so the no-TempNet baseline runs this same code.

`dro_loss` is the reference: it takes materialised logits (each tensor-parallel rank holds its contiguous
vocabulary shard) and uses megatron-core's vocab_parallel_cross_entropy for the tau-scaled cross-entropy.
`linear_dro_loss` is the same loss from the final hidden states and the output weight; the fused
implementation (tempnet_kernels.dro_cce) never materialises the logits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
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
        ce = tensor_parallel.vocab_parallel_cross_entropy(_mask_padded_vocab(z, vocab_size), targets)
        return ce + (rho - math.log(vocab_size))
    tau = tau.float()
    # Each rank's z/tau sees only its shard, so its contribution to dL/dtau is partial: the copy sums them.
    tau_for_scale = tau
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        tau_for_scale = tensor_parallel.copy_to_tensor_model_parallel_region(tau)
    # Mask after scaling: the padded entries' -inf must not meet tau's gradient (0 * inf).
    scaled = _mask_padded_vocab(z / tau_for_scale.unsqueeze(-1), vocab_size)
    ce = tensor_parallel.vocab_parallel_cross_entropy(scaled, targets)
    return tau * ce + tau * (rho - math.log(vocab_size))


def tau_scaled_cross_entropy(loss: torch.Tensor, tau: Optional[torch.Tensor], rho: float, vocab_size: int) -> torch.Tensor:
    """CE(z / tau) recovered from the DRO loss, for logging: L / tau - (rho - log V)."""
    t = 1.0 if tau is None else tau.float()
    return loss.detach() / t - (rho - math.log(vocab_size))
