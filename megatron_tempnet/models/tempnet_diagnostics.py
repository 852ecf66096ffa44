"""Does TempNet learn a per-token temperature? The statistics that tell, from vocabulary-parallel logits.

The DRO loss's gradient in tau (docs/design.md) is dL/dtau = H(softmax(z / tau)) - (log V - rho): the entropy of the
tempered prediction minus the target entropy log V - rho. The entropy grows with tau, so each token has one
best temperature, its per-token optimum

    tau*  solving  H(softmax(z / tau*)) = log V - rho,     clipped to [tau_min, tau_max],

found here by bisection on log tau. A TempNet that learns tracks tau* (Spearman(tau, tau*) near 1) and spreads
its temperatures over the tokens; one that does not gives every token the same tau. `summarize` turns the
per-token values of an evaluation into the figures the run logs: tau's std and percentiles, the fractions of
tokens pinned at a bound, Spearman(tau, tau*), Spearman(tau, H(softmax z)) and the logit scale.

Every function takes this rank's vocabulary shard [..., V/TP] of the logits (padding beyond the true vocabulary
excluded by `vocab_size`) and combines the shards over `group` (None: one rank holds the whole vocabulary).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

# A tau whose per-token std stays below this after warm-up is, for all purposes, one global temperature.
INERT_TAU_STD = 1e-3
# A token "sits at a bound" when its tau is within this fraction of the range from tau_min or tau_max.
BOUND_FRACTION = 0.01


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _true_vocab(logits_shard: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """The shard's columns that are real vocabulary entries, fp32."""
    valid = max(0, min(logits_shard.size(-1), vocab_size - vocab_start))
    return logits_shard[..., :valid].float()


@torch.no_grad()
def tempered_entropy(logits_shard: torch.Tensor, tau: torch.Tensor, vocab_size: int, vocab_start: int = 0,
                     group=None) -> torch.Tensor:
    """H(softmax(z / tau)) in nats over the true vocabulary. logits_shard: [N, V/TP]; tau: [N] (> 0). Returns [N]."""
    z = _true_vocab(logits_shard, vocab_size, vocab_start) / tau.float().unsqueeze(-1)
    empty = z.size(-1) == 0
    m = z.new_full(z.shape[:-1], -math.inf) if empty else z.amax(-1)
    m = _all_reduce(m, dist.ReduceOp.MAX, group)
    e = torch.exp(z - m.unsqueeze(-1))
    sums = torch.stack([e.sum(-1), (e * z).sum(-1)])  # sum exp, sum exp * z: one all-reduce for both
    sums = _all_reduce(sums, dist.ReduceOp.SUM, group)
    # H = logsumexp(z) - E_p[z]
    return m + sums[0].log() - sums[1] / sums[0]


@torch.no_grad()
def optimal_tau(logits_shard: torch.Tensor, target_entropy: float, tau_min: float, tau_max: float,
                vocab_size: int, vocab_start: int = 0, group=None, iters: int = 40) -> torch.Tensor:
    """Per-token optimum of the DRO loss: tau* with H(softmax(z / tau*)) = target_entropy, clipped to
    [tau_min, tau_max]. logits_shard: [N, V/TP]. Returns [N] fp32.

    Bisection on log tau (the entropy is increasing in tau): after `iters` halvings of log(tau_max / tau_min)
    the bracket is narrower than 1e-10 relative for the default 40 and any range up to 1e5."""
    n = logits_shard.shape[:-1]
    lo = torch.full(n, math.log(tau_min), dtype=torch.float32, device=logits_shard.device)
    hi = torch.full(n, math.log(tau_max), dtype=torch.float32, device=logits_shard.device)
    for _ in range(iters):
        mid = (lo + hi) / 2
        too_hot = tempered_entropy(logits_shard, mid.exp(), vocab_size, vocab_start, group) > target_entropy
        hi = torch.where(too_hot, mid, hi)
        lo = torch.where(too_hot, lo, mid)
    return ((lo + hi) / 2).exp()


@torch.no_grad()
def logit_scale(logits_shard: torch.Tensor, vocab_size: int, vocab_start: int = 0, group=None) -> torch.Tensor:
    """Per-token standard deviation of the logits over the true vocabulary. [N, V/TP] -> [N]."""
    z = _true_vocab(logits_shard, vocab_size, vocab_start).double()
    sums = torch.stack([z.sum(-1), (z * z).sum(-1)])
    sums = _all_reduce(sums, dist.ReduceOp.SUM, group)
    mean = sums[0] / vocab_size
    return (sums[1] / vocab_size - mean * mean).clamp_min(0).sqrt().float()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-D tensor, ties sharing their average rank."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank of each distinct value's first occurrence
    return (first.double() + (counts.double() - 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (average ranks for ties); nan when either is constant."""
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"spearman needs two tensors of the same length >= 2; got {x.numel()} and {y.numel()}")
    rx, ry = _ranks(x.flatten()), _ranks(y.flatten())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def summarize(tau: torch.Tensor, tau_opt: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
              scale: Optional[torch.Tensor], tau_min: float, tau_max: float) -> dict:
    """Figures of one evaluation from per-token values (all 1-D, one entry per evaluated token):
    tau, its per-token optimum tau*, the next-token entropy H(softmax z) (nats) and the logit scale.

    Keys: tau_std, tau_p5, tau_p50, tau_p95, frac_at_min, frac_at_max (within BOUND_FRACTION of the range),
    tau_opt_mean, tau_opt_std, spearman_tau_opt, spearman_tau_entropy, logit_scale."""
    tau = tau.double().flatten()
    p5, p50, p95 = torch.quantile(tau, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    margin = BOUND_FRACTION * (tau_max - tau_min)
    out = {"tau_std": float(tau.std(unbiased=False)), "tau_p5": p5, "tau_p50": p50, "tau_p95": p95,
           "frac_at_min": float((tau <= tau_min + margin).double().mean()),
           "frac_at_max": float((tau >= tau_max - margin).double().mean())}
    if tau_opt is not None:
        out.update(tau_opt_mean=float(tau_opt.double().mean()), tau_opt_std=float(tau_opt.double().std(unbiased=False)),
                   spearman_tau_opt=spearman(tau, tau_opt))
    if entropy is not None:
        out["spearman_tau_entropy"] = spearman(tau, entropy)
    if scale is not None:
        out["logit_scale"] = float(scale.double().mean())
    return out
