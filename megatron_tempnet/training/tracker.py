"""Console and TensorBoard logging of a run, from the last rank (the one that holds the loss).

Logged per interval: loss (the DRO objective), ce (cross-entropy with TempNet's tau), perplexity, learning
rate, grad norm, tau mean/std and histogram, tokens/s, and on a GPU an MFU estimate. Per evaluation with a
temperature also its per-token diagnostics (TAU_DIAGNOSTICS), and a warning, once, when TempNet is inert.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..models.registry import get_family, model_dims
from ..models.tempnet_diagnostics import INERT_TAU_STD

# Dense bf16 peak per device, FLOP/s (FP8 doubles it on Hopper).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


def peak_flops(fp8: bool) -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak * (2 if fp8 else 1)
    return None


# Per-token diagnostics of an evaluation with a temperature (models/tempnet_diagnostics.summarize).
TAU_DIAGNOSTICS = ("tau_p5", "tau_p50", "tau_p95", "frac_at_min", "frac_at_max", "tau_opt_mean", "tau_opt_std",
                   "spearman_tau_opt", "spearman_tau_entropy", "logit_scale")


def tau_diagnostics_line(m: dict) -> str:
    """One console line of an evaluation's tau diagnostics."""
    line = (f"tau per token: std {m['tau_std']:.4f} | p5/p50/p95 {m['tau_p5']:.3f}/{m['tau_p50']:.3f}/{m['tau_p95']:.3f}"
            f" | at tau_min/tau_max {100 * m['frac_at_min']:.1f}%/{100 * m['frac_at_max']:.1f}%")
    if "tau_opt_mean" in m:
        line += (f" | tau* {m['tau_opt_mean']:.3f}±{m['tau_opt_std']:.3f}"
                 f" | Spearman(tau, tau*) {m['spearman_tau_opt']:.3f}")
    return line + (f" | Spearman(tau, H) {m['spearman_tau_entropy']:.3f} | logit scale {m['logit_scale']:.3f}")


class RunLogger:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.is_logger = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        self.writer = None
        if self.is_logger and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.logging.tensorboard_dir)
        self._t0 = time.perf_counter()
        self._tokens = 0.0
        self._warned_inert = False
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.flops_per_token = get_family(cfg.model.arch).flops_per_token(model_dims(cfg.model))

    def train_step(self, iteration: int, metrics: dict) -> None:
        self._tokens += metrics["tokens"]
        tau_values = metrics.get("tau_values")
        if self.writer is not None and tau_values is not None and iteration % self.cfg.logging.tau_histogram_interval == 0:
            self.writer.add_histogram("tau/histogram", tau_values, iteration)
        if iteration % self.cfg.logging.log_interval != 0 and iteration != self.cfg.train.train_iters:
            return
        elapsed = time.perf_counter() - self._t0
        tps = self._tokens / max(elapsed, 1e-9)
        self._t0, self._tokens = time.perf_counter(), 0.0
        metrics = {**metrics, "tokens_per_s": tps, "ppl": math.exp(min(metrics["ce_tau"], 50.0))}
        peak = peak_flops(self.cfg.fp8.fp8_format is not None)
        if peak:
            metrics["mfu"] = tps * self.flops_per_token / (peak * self.world_size)
        if not self.is_logger:
            return
        line = (f"iter {iteration:6d}/{self.cfg.train.train_iters} | loss {metrics['loss']:.4f} | ce {metrics['ce_tau']:.4f}"
                f" | ppl {metrics['ppl']:.2f} | lr {metrics['lr']:.3e} | grad norm {metrics['grad_norm']:.3f}"
                f" | tau {metrics['tau_mean']:.3f}±{metrics['tau_std']:.3f} | {tps:,.0f} tok/s")
        if "mfu" in metrics:
            line += f" | MFU {100 * metrics['mfu']:.1f}%"
        if not metrics["update_successful"]:
            line += " | step skipped"
        print(line, flush=True)
        if self.writer is not None:
            for key in ("loss", "ce_tau", "ppl", "lr", "grad_norm", "tau_mean", "tau_std", "tokens_per_s", "mfu"):
                if key in metrics:
                    self.writer.add_scalar(f"train/{key}", metrics[key], iteration)

    def evaluation(self, iteration: int, metrics: dict, split: str = "valid") -> None:
        if not self.is_logger:
            return
        print(f"[{split}] iter {iteration} | loss {metrics['loss']:.4f} | ppl (tau=1) {metrics['ppl']:.2f}"
              f" | ppl (TempNet tau) {metrics['ppl_tau']:.2f} | tau {metrics['tau_mean']:.3f}±{metrics['tau_std']:.3f}",
              flush=True)
        if "tau_p50" in metrics:
            print(f"[{split}] iter {iteration} | {tau_diagnostics_line(metrics)}", flush=True)
            self._warn_if_inert(iteration, metrics)
        if self.writer is not None:
            for key in ("loss", "ppl", "ppl_tau", "tau_mean", "tau_std") + TAU_DIAGNOSTICS:
                if key in metrics:
                    self.writer.add_scalar(f"{split}/{key}", metrics[key], iteration)
            self.writer.flush()

    def _warn_if_inert(self, iteration: int, metrics: dict) -> None:
        """Once per run: TempNet past warm-up still gives every token the same temperature."""
        cfg = self.cfg
        if (self._warned_inert or cfg.tempnet.kind != "network" or iteration <= cfg.train.lr_warmup_iters
                or metrics["tau_std"] >= INERT_TAU_STD):
            return
        self._warned_inert = True
        tn = cfg.tempnet
        opt = (f"; the per-token optimum tau* is {metrics['tau_opt_mean']:.3g} on average against tau "
               f"{metrics['tau_p50']:.3g}" if "tau_opt_mean" in metrics else "")
        print(f"warning: TempNet's per-token tau std is {metrics['tau_std']:.2g} < {INERT_TAU_STD:g} at iteration "
              f"{iteration}: every token gets about the same temperature. Likely causes: a target entropy "
              f"(--dro-target-entropy) the tempered predictions cannot reach within [--tempnet-tau-min "
              f"{tn.tau_min:g}, --tempnet-tau-max {tn.tau_max:g}]{opt}; a start far from it (--tempnet-tau-init); "
              f"too small a learning-rate budget (--tempnet-lr {tn.lr:g} x {iteration} steps; of order 1 is needed); "
              f"tokens that differ mainly in logit scale (--tempnet-scale-input)", flush=True)

    def message(self, text: str) -> None:
        if self.is_logger:
            print(text, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
