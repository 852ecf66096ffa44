"""Training in this process, on one rank, from a dataset object: the small LMs that adaptive decoding and the
benchmarks train for themselves, with the project's trainer (setup_run, train_step: megatron-core's schedules
and optimizer) but without data files or the run loop's logging, evaluation and checkpoint schedule.

`train_lm` trains on any map-style dataset; `train_mixture_lm` trains the tiny LM of adaptive decoding's
built-in task mixture (adaptive/tasks.py) and hands it back as adaptive decoding's frozen LanguageModel.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from .. import runtime
from ..adaptive.lm import LanguageModel, ensure_process_group, mixture_lm_config
from ..adaptive.tasks import MixtureCorpus, MixtureTokenizer
from ..config import Config
from ..checkpoint import save_checkpoint
from ..finalize import validate
from .loop import data_iterators, setup_run
from .step import train_step


def train_lm(cfg: Config, dataset, log: Optional[Callable[[str], None]] = None,
             before_training: Optional[Callable[[list, object], None]] = None) -> tuple:
    """Train an LM with the project's trainer on a map-style dataset of {"tokens", "labels", "loss_mask"}
    items, in this process (1 rank). before_training(model chunks, optimizer) runs once they are built.
    Returns (model chunks, per-step metrics)."""
    validate(cfg, 1, cuda_available=runtime.use_cuda(), te_available=runtime.transformer_engine_available())
    ensure_process_group(cfg.train.seed)
    model, optimizer, scheduler = setup_run(cfg)
    if before_training is not None:
        before_training(model, optimizer)
    iters = data_iterators(cfg, dataset, 0, len(model))
    history, t0 = [], time.perf_counter()
    for it in range(1, cfg.train.train_iters + 1):
        metrics = train_step(cfg, model, optimizer, scheduler, iters)
        history.append({k: v for k, v in metrics.items() if k != "tau_values"})
        if log and (it % 50 == 0 or it == cfg.train.train_iters):
            recent = history[-50:]
            mean = lambda k: sum(h[k] for h in recent) / len(recent)  # noqa: E731
            log(f"LM iter {it}/{cfg.train.train_iters} | loss {mean('loss'):.4f} | ce(z/tau) {mean('ce_tau'):.4f} | "
                f"tau {mean('tau_mean'):.3f} +- {mean('tau_std'):.3f} | {time.perf_counter() - t0:.1f} s")
    return model, history


def train_mixture_lm(steps: int = 800, seed: int = 1234, log: Optional[Callable[[str], None]] = None,
                     save: Optional[str] = None, **overrides) -> LanguageModel:
    """Train the tiny LM of the built-in mixture (adaptive.lm.mixture_lm_config; overrides as there);
    optionally save its weights (model-only checkpoint) to the folder `save`."""
    cfg = mixture_lm_config(train__train_iters=steps, train__seed=seed, **overrides)
    corpus = MixtureCorpus(steps * cfg.train.global_batch_size, cfg.model.seq_length, seed)
    model, _ = train_lm(cfg, corpus, log)
    if save:
        save_checkpoint(cfg, steps, steps * cfg.train.global_batch_size, model, save_dir=save, keep_last=1)
    return LanguageModel(model[0], cfg, MixtureTokenizer())
