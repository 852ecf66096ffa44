"""One training step and one evaluation pass through megatron-core's pipeline schedules.

The schedules (no pipelining, 1F1B, interleaved 1F1B) call `forward_step` per micro-batch; on the last
stage `loss_func` turns the model's per-token loss into a token sum, which megatron-core backpropagates and
later divides by the global token count (calculate_per_token_loss): the loss is the mean over every
token of the global batch, at any DP size and any number of micro-batches.

The step extensions attached to the model (training/extensions.py: attention transfer) run before each
schedule, before each micro-batch's forward, and add their metrics after the step or the evaluation.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from .. import runtime
from ..config import Config
from ..models.language_model import LMOutput
from ..models.tempnet import TempNet, shared_across_micro_batches
from ..models.tempnet_diagnostics import summarize as summarize_tau
from .batches import Batch
from .extensions import StepExtension, attached
from ..models.build import unwrap

# Layout of the per-micro-batch statistics vector (summed over micro-batches and DP ranks).
STATS = ("loss_sum", "tokens", "ce_tau_sum", "tau_sum", "tau_sq_sum", "ce1_sum")
# Per-token diagnostics an evaluation collects besides tau (LMOutput.diagnostics).
DIAGNOSED = ("tau_opt", "entropy", "logit_scale")


def loss_func(loss_mask: torch.Tensor, output: LMOutput):
    """(loss sum, token count, report) for one micro-batch on the last stage."""
    with runtime.native_torch():  # our code asks for no CUDA device
        mask = loss_mask.float()
        loss_sum = (output.loss * mask).sum()
        tokens = mask.sum()
        ce_tau = output.ce_tau
        tau = output.tau.detach().float() if output.tau is not None else torch.ones_like(mask)
        ce1 = output.ce_at_tau1 if output.ce_at_tau1 is not None else ce_tau
        stats = torch.stack([
            loss_sum.detach(), tokens, (ce_tau * mask).sum(), (tau * mask).sum(), (tau * tau * mask).sum(),
            (ce1.detach() * mask).sum(),
        ])
        report = {"stats": stats}
        if output.tau is not None:  # the masked values are picked once per step (_reduce_reports): one host sync
            report.update(tau=tau, mask=mask)
        if output.diagnostics:  # evaluation: the diagnosed tokens' values, one row per DIAGNOSED key
            picked = mask.bool() & output.diagnostics["entropy"].isfinite()
            rows = [tau] + [output.diagnostics.get(k, torch.full_like(tau, float("nan"))) for k in DIAGNOSED]
            report["diagnostics"] = torch.stack([r[picked] for r in rows]).cpu()
        return loss_sum, tokens.to(torch.int), report


def forward_step(extensions: Sequence[StepExtension], data_iterator: Iterator[Batch], model: torch.nn.Module):
    with runtime.native_torch():  # the data pipeline and the model ask for no CUDA device
        batch = next(data_iterator)
        for ext in extensions:
            ext.before_forward(model, batch)
        output = model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels)
    return output, partial(loss_func, batch.loss_mask)


def _num_microbatches(cfg: Config) -> int:
    dp = parallel_state.get_data_parallel_world_size()
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def _reduce_reports(reports: list) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sum the statistics over micro-batches and DP ranks, shared with every pipeline stage.
    Returns (stats [len(STATS)] float64, this rank's tau values or None)."""
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    taus = None
    if last_stage and reports:
        stats = torch.stack([r["stats"] for r in reports]).double().sum(0)
        if "tau" in reports[0]:
            tau, mask = (torch.cat([r[k].reshape(-1) for r in reports]) for k in ("tau", "mask"))
            taus = tau[mask.bool()].cpu()
    stats = stats.to(runtime.device())
    if last_stage:
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(stats, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return stats.cpu(), taus


def metrics_from_stats(stats: torch.Tensor) -> dict:
    """Token means of the summed statistics: loss, CE with tau (ce_tau), CE at tau = 1 (ce), tau mean/std."""
    s = dict(zip(STATS, stats.tolist()))
    n = max(s["tokens"], 1.0)
    tau_mean = s["tau_sum"] / n
    return {
        "loss": s["loss_sum"] / n,
        "ce_tau": s["ce_tau_sum"] / n,
        "ce": s["ce1_sum"] / n,
        "tau_mean": tau_mean,
        "tau_std": math.sqrt(max(s["tau_sq_sum"] / n - tau_mean**2, 0.0)),
        "tokens": s["tokens"],
    }


def _tau_diagnostics(cfg: Config, diagnosed: List[torch.Tensor]) -> dict:
    """tempnet_diagnostics.summarize over the diagnosed tokens of every data-parallel rank of the last stage.
    diagnosed: [1 + len(DIAGNOSED), n_i] per micro-batch (tau first)."""
    values = torch.cat(diagnosed, dim=1)
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, values, group=group)
        values = torch.cat(parts, dim=1)
    if values.size(1) < 2:
        return {}
    tau, tau_opt, entropy, scale = values
    tn = cfg.tempnet
    return summarize_tau(tau, tau_opt if tau_opt.isfinite().all() else None, entropy, scale, tn.tau_min, tn.tau_max)


def _run_schedule(cfg: Config, model: List[torch.nn.Module], data_iterators, forward_only: bool) -> list:
    num_microbatches = _num_microbatches(cfg)
    extensions = attached(model)
    for ext in extensions:
        data_iterators = ext.before_schedule(model, data_iterators, num_microbatches)
    tempnets = [t for t in (unwrap(chunk).tempnet for chunk in model) if isinstance(t, TempNet)]
    # The weights are fixed until the optimizer step: TempNet's first layer shares work across micro-batches.
    with shared_across_micro_batches(tempnets, backward_passes=0 if forward_only else num_microbatches):
        return get_forward_backward_func()(
            forward_step_func=partial(forward_step, extensions),
            data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
            model=model,
            num_microbatches=num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=forward_only,
        )


def train_step(cfg: Config, model: List[torch.nn.Module], optimizer, scheduler, data_iterators) -> dict:
    """Forward, backward and optimizer step on one global batch. Returns metrics (same on every rank).

    A non-finite loss or gradient norm skips the update (metrics["update_successful"] is False): the weights,
    optimizer state and schedule stay as they were. Every rank sees the same loss (broadcast) and grad norm
    (all-reduced), so they all skip together.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    with runtime.native_torch():
        optimizer.zero_grad()
    reports = _run_schedule(cfg, model, data_iterators, forward_only=False)
    stats, taus = _reduce_reports(reports)
    metrics = metrics_from_stats(stats)
    for ext in attached(model):
        metrics.update(ext.metrics(metrics["tokens"]))
    # optimizer.step(), in its parts, so that a bad step can be refused before the update.
    found_inf = optimizer.prepare_grads()  # mixed precision: unscale and check; fp32: wire the main grads
    grad_norm = optimizer.clip_grad_norm(cfg.train.clip_grad) if cfg.train.clip_grad > 0 else optimizer.get_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    update_successful = not found_inf and math.isfinite(grad_norm) and math.isfinite(metrics["loss"])
    if update_successful:
        with runtime.native_torch():  # the update asks for no CUDA device (grad clipping does)
            optimizer.step_with_ready_grads()
        scheduler.step(increment=cfg.train.global_batch_size)
    metrics.update(grad_norm=grad_norm, update_successful=update_successful,
                   lr=scheduler.get_lr(optimizer.param_groups[0]), tau_values=taus)
    return metrics


@torch.no_grad()
def evaluate(cfg: Config, model: List[torch.nn.Module], data_iterators, num_batches: int) -> dict:
    """Token means over `num_batches` global batches: loss, ce / ppl at tau = 1, ce_tau / ppl_tau with
    TempNet's temperatures, and tau statistics; with a temperature also its per-token diagnostics
    (tempnet_diagnostics.summarize: percentiles, bound fractions, Spearman(tau, tau*), ...)."""
    for chunk in model:
        chunk.eval()
    stats, diagnosed = 0, []
    try:
        for _ in range(num_batches):
            reports = _run_schedule(cfg, model, data_iterators, forward_only=True)
            stats = stats + _reduce_reports(reports)[0]
            diagnosed += [r["diagnostics"] for r in reports if "diagnostics" in r]
    finally:
        for chunk in model:
            chunk.train()
    out = metrics_from_stats(stats)
    if diagnosed:  # the last stage; the logging rank is one of its ranks
        out.update(_tau_diagnostics(cfg, diagnosed))
    for ext in attached(model):
        out.update(ext.metrics(out["tokens"]))
    out["ppl"] = math.exp(min(out["ce"], 50.0))
    out["ppl_tau"] = math.exp(min(out["ce_tau"], 50.0))
    return out
