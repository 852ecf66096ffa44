"""TempNet: a small network that predicts a temperature for every token from the LM's logits.

Qiu et al. 2024, "To Cool or not to Cool? Temperature Network Meets Large Foundation Models via DRO".
With z the token's logits over the true vocabulary (detached: no gradient reaches the LM through here):

    x   = z / ||z||                        ("normalized";  "max_shifted" uses z - max(z) instead of z)
    h   = W2 . dropout(sigmoid(W1 x + b1 [+ u log RMS(z)])) + b2     W1: V -> d,  W2: d -> d
    w   = softmax(h / exp(s))                            s: learnable scalar, starts at 0
    tau = tau_min + (tau_max - tau_min) * sigmoid(a . ((w - 1/d) * h) + c)

Initialisation. The reference's (`tau_init None`): a = 1, c = 0. Then the pooled term a . ((w - 1/d) * h) is
never negative and varies by ~1e-5 between tokens, so every token starts on one shared floor above
tau_min + (tau_max - tau_min) sigmoid(0), which can lie far above the per-token optima. With `tau_init` (the
default): a = 0 and c = logit((tau_init - tau_min) / (tau_max - tau_min)), so every token starts exactly at
tau_init, and the first steps move a, which then lets the gradient into h and the first layer.

Scale. x = z / ||z|| is blind to the logits' scale: TempNet(k z) = TempNet(z), while the DRO loss's per-token
optimum scales with it, tau*(k z) = k tau*(z) (models/tempnet_diagnostics.py). `scale_input` adds the term
u log RMS(z), RMS(z) = ||z|| / sqrt(V), to the first layer (u: d weights, starting at 0). It needs nothing but
||z||^2, which the logits-free input computes anyway.

Vocabulary parallelism: W1's columns are split like the output layer's rows, so each tensor-parallel rank
holds W1[:, its vocabulary shard]. The rank computes W1_shard z_shard and ||z_shard||^2; one all-reduce
sums both, and everything after W1 is replicated on every TP rank. Padded vocabulary entries are
excluded (their logits count as 0).

Two ways to get the first layer, with the same result:
- `forward(logits_shard)` from materialised vocabulary-parallel logits;
- `forward_from_hidden(hidden, output_weight_shard)` without logits: W1 z = (W1 C) e and
  ||z||^2 = e^T (C^T C) e, with e the final hidden state and C the output weight. Cost: a d x D and a D x D
  matrix instead of N x V logits (tempnet_kernels.dro_cce.tempnet_first_layer_logits_free), computed once per
  optimizer step for all its micro-batches, and W1's gradient (a d x D x V product) once per step too
  (`shared_across_micro_batches`, entered by the training step).

Every parameter carries `is_tempnet_parameter = True`, so the optimizer can give TempNet its own learning rate.

Checkpoints: both modules say how they are stored (`sharded_state_dict`, as megatron-core modules do): TempNet's
W1 [d, V/TP] as one global [d, V_padded] tensor split by TP along dim 1, everything else replicated.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from tempnet_kernels.dro_cce import W1GradientAccumulator, classifier_statistics, tempnet_first_layer_logits_free

from ..config import TempNetConfig

TEMPNET_SEED_OFFSET = 7


def _uniform(gen: torch.Generator, shape, bound: float) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def tau_logit(tau: float, tau_min: float, tau_max: float) -> float:
    """The pre-sigmoid score at which tau_min + (tau_max - tau_min) sigmoid(score) equals tau."""
    q = (tau - tau_min) / (tau_max - tau_min)
    return math.log(q / (1 - q))


def _sharded_state_dict(module: torch.nn.Module, prefix: str, sharded_offsets: tuple, metadata: Optional[dict],
                        tp_split: dict) -> dict:
    """megatron-core ShardedTensors of `module`'s state: the parameters named in `tp_split` split by TP along
    the given dim, the rest replicated over TP and DP."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    dp_cp_group = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(with_context_parallel=True)
    return make_sharded_tensors_for_checkpoint(
        module.state_dict(prefix="", keep_vars=True), prefix, tp_split, sharded_offsets,
        tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=dp_cp_group)


def _vocab_shard(padded_vocab_size: int) -> tuple[int, int]:
    """(start, size) of this rank's contiguous vocabulary shard."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    size = padded_vocab_size // tp_size
    return parallel_state.get_tensor_model_parallel_rank() * size, size


class TempNet(torch.nn.Module):
    def __init__(self, cfg: TempNetConfig, vocab_size: int, padded_vocab_size: int, seed: int):
        super().__init__()
        d = cfg.hidden_size
        self.hidden_size = d
        self.tau_min, self.tau_max = cfg.tau_min, cfg.tau_max
        self.input_variant = cfg.input_variant
        self.vocab_size = vocab_size
        start, size = _vocab_shard(padded_vocab_size)
        self.vocab_start = start
        # Columns of this shard that are real vocabulary entries (the rest is padding).
        self.valid_local = max(0, min(size, vocab_size - start))

        # Initialised from a generator of its own, over the full vocabulary, then sliced: the same weights
        # at every TP size. Same distributions as torch.nn.Linear's defaults.
        gen = torch.Generator().manual_seed(seed + TEMPNET_SEED_OFFSET)
        w1_full = _uniform(gen, (d, padded_vocab_size), 1 / math.sqrt(vocab_size))
        self.w1 = torch.nn.Parameter(w1_full[:, start : start + size].clone())
        tensor_parallel.set_tensor_model_parallel_attributes(self.w1, is_parallel=True, dim=1, stride=1)
        self.b1 = torch.nn.Parameter(_uniform(gen, (d,), 1 / math.sqrt(vocab_size)))
        # u: the weight of log RMS(z) in the first layer (scale_input only)
        self.scale_weight = torch.nn.Parameter(torch.zeros(d)) if cfg.scale_input else None
        self.proj = torch.nn.Linear(d, d)
        self.log_scale = torch.nn.Parameter(torch.zeros(()))  # s
        self.last = torch.nn.Linear(d, 1)
        with torch.no_grad():
            self.proj.weight.copy_(_uniform(gen, (d, d), 1 / math.sqrt(d)))
            self.proj.bias.copy_(_uniform(gen, (d,), 1 / math.sqrt(d)))
            if cfg.tau_init is None:  # the reference's
                self.last.weight.fill_(1.0)
                self.last.bias.fill_(0.0)
            else:  # every token at tau_init
                self.last.weight.fill_(0.0)
                self.last.bias.fill_(tau_logit(cfg.tau_init, cfg.tau_min, cfg.tau_max))
        self.dropout = torch.nn.Dropout(cfg.dropout)
        for p in self.parameters():
            p.is_tempnet_parameter = True
        # W1 C, C^T C, ... of the current weights and W1's gradient accumulator, shared by the micro-batches of
        # one step (None: off); see shared_across_micro_batches.
        self._step_cache: Optional[dict] = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        """W1 ([d, V/TP], vocabulary-parallel) split by TP along dim 1, the rest replicated. (megatron-core's
        default for a plain module would mark W1 replicated too.)"""
        return _sharded_state_dict(self, prefix, sharded_offsets, metadata, {"w1": 1})

    # -- first layer -------------------------------------------------------------------------------------

    def _reduce(self, w1z: torch.Tensor, sq_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum the shards' partial products over the TP group (W1 gets each rank's full upstream gradient)."""
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            w1z = tensor_parallel.reduce_from_tensor_model_parallel_region(w1z)
            dist.all_reduce(sq_norm, group=parallel_state.get_tensor_model_parallel_group())
        return w1z, sq_norm

    def forward(self, logits_shard: torch.Tensor) -> torch.Tensor:
        """logits_shard: [..., V/TP] vocabulary-parallel logits. Returns tau: [...] in [tau_min, tau_max]."""
        z = logits_shard.detach().float()[..., : self.valid_local]
        if self.input_variant == "max_shifted":
            z = z - vocab_parallel_max(z).unsqueeze(-1)
        w1z = z @ self.w1[:, : self.valid_local].t()
        sq_norm = (z * z).sum(-1)
        return self.head(*self._reduce(w1z, sq_norm))

    def forward_from_hidden(
        self, hidden: torch.Tensor, output_weight: torch.Tensor, logit_max: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits-free first layer. hidden: [..., D] final hidden states e; output_weight: [V/TP, D] this
        rank's rows of C; logit_max: [...] global max_k z_k, needed by the max_shifted variant."""
        if self.input_variant == "max_shifted" and logit_max is None:
            raise ValueError("the max_shifted TempNet input needs the per-token logit max (logit_max)")
        group = parallel_state.get_tensor_model_parallel_group()
        stats = accumulator = None
        if self._step_cache is not None:
            if "stats" not in self._step_cache:
                self._step_cache["stats"] = classifier_statistics(
                    output_weight.detach(), self.w1.detach(), self.vocab_size, self.vocab_start, group)
            stats, accumulator = self._step_cache["stats"], self._step_cache["w1_grad"]
        w1z, sq_norm = tempnet_first_layer_logits_free(
            hidden, output_weight, self.w1, self.vocab_size, self.vocab_start, group,
            shift=logit_max if self.input_variant == "max_shifted" else None, stats=stats,
            w1_grad_accumulator=accumulator)
        return self.head(w1z, sq_norm)

    # -- the rest (replicated on every TP rank) ----------------------------------------------------------

    def head(self, w1z: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
        """w1z: [..., d] = W1 z; sq_norm: [...] = ||z||^2. Returns tau: [...]."""
        sq_norm = sq_norm.clamp_min(1e-24)
        x = w1z / sq_norm.sqrt().unsqueeze(-1) + self.b1  # W1 (z/||z||) + b1
        if self.scale_weight is not None:  # + u log RMS(z)
            x = x + 0.5 * (sq_norm / self.vocab_size).log().unsqueeze(-1) * self.scale_weight
        h = self.proj(self.dropout(torch.sigmoid(x)))
        w = F.softmax(h / self.log_scale.exp(), dim=-1)
        score = self.last((w - 1.0 / self.hidden_size) * h).squeeze(-1)
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(score)


@contextlib.contextmanager
def shared_across_micro_batches(tempnets: Iterable[TempNet], backward_passes: int = 0) -> Iterator[None]:
    """Inside, each TempNet's logits-free input computes W1 C and C^T C once and reuses them for every
    micro-batch: they depend on the weights only, and the weights do not change within one schedule run
    (forward and backward of all micro-batches, before the optimizer step). With `backward_passes` (the
    step's micro-batches, 0 for forward-only runs), W1's gradient is also formed once, in the last
    micro-batch's backward (W1GradientAccumulator). Leave before the weights change."""
    tempnets = list(tempnets)
    for t in tempnets:
        t._step_cache = {"w1_grad": W1GradientAccumulator(backward_passes) if backward_passes else None}
    try:
        yield
    finally:
        accumulators = [t._step_cache["w1_grad"] for t in tempnets]
        for t in tempnets:
            t._step_cache = None
    short = [a for a in accumulators if a is not None and a.pending]
    if short:  # reached only without an exception in flight
        raise RuntimeError(
            f"TempNet's W1 gradient was never formed: the step was set up for {backward_passes} micro-batch "
            f"backward passes and {short[0].seen} ran; pass the number of micro-batches that run a backward")


def vocab_parallel_max(z_shard: torch.Tensor) -> torch.Tensor:
    """max over the last (vocabulary-parallel) dimension across the TP group, without gradient."""
    m = z_shard.detach().amax(-1) if z_shard.size(-1) else z_shard.new_full(z_shard.shape[:-1], -float("inf"))
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    return m


class GlobalTemperature(torch.nn.Module):
    """One learned temperature for every token (the ablation without TempNet):
    tau = tau_min + (tau_max - tau_min) * sigmoid(theta), theta starting where TempNet's tau does (tau_init, or
    mid-range without it). Same interface as TempNet."""

    input_variant = "normalized"  # needs no logit max

    def __init__(self, cfg: TempNetConfig):
        super().__init__()
        self.tau_min, self.tau_max = cfg.tau_min, cfg.tau_max
        theta = 0.0 if cfg.tau_init is None else tau_logit(cfg.tau_init, cfg.tau_min, cfg.tau_max)
        self.theta = torch.nn.Parameter(torch.tensor(theta))
        self.theta.is_tempnet_parameter = True

    def _tau(self, shape, device) -> torch.Tensor:
        tau = self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(self.theta)
        return tau.to(device).expand(shape)

    def forward(self, logits_shard: torch.Tensor) -> torch.Tensor:
        return self._tau(logits_shard.shape[:-1], logits_shard.device)

    def forward_from_hidden(self, hidden, output_weight, logit_max=None) -> torch.Tensor:
        return self._tau(hidden.shape[:-1], hidden.device)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        """theta, replicated."""
        return _sharded_state_dict(self, prefix, sharded_offsets, metadata, {})
