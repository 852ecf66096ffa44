"""Console and TensorBoard logging of a run, from the last rank (the one that holds the loss).

Logged per interval: loss (the DRO objective), ce (cross-entropy with TempNet's tau), perplexity, learning
rate, grad norm, tau mean/std and histogram, tokens/s, and on a GPU an MFU estimate.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..config import Config, ffn_hidden_size, padded_vocab_size

# Dense bf16 peak per device, FLOP/s (FP8 doubles it on Hopper).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12}


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6 x (dense parameters) for the matmuls
    plus 12 x layers x hidden x seq for attention scores and values (the PaLM formula)."""
    m = cfg.model
    h, L, s = m.hidden_size, m.num_layers, m.seq_length
    kv = h * (m.num_query_groups or m.num_attention_heads) // m.num_attention_heads
    mlp = (3 if m.arch == "llama" else 2) * h * ffn_hidden_size(m)
    per_layer = h * h * 2 + 2 * h * kv + mlp  # q, o, k, v, MLP
    return 6 * (L * per_layer + h * padded_vocab_size(m)) + 12 * L * h * s


def peak_flops(fp8: bool) -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak * (2 if fp8 else 1)
    return None


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
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

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
            metrics["mfu"] = tps * flops_per_token(self.cfg) / (peak * self.world_size)
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
        if self.writer is not None:
            for key in ("loss", "ppl", "ppl_tau", "tau_mean", "tau_std"):
                self.writer.add_scalar(f"{split}/{key}", metrics[key], iteration)
            self.writer.flush()

    def message(self, text: str) -> None:
        if self.is_logger:
            print(text, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
