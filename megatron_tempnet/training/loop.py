"""The training run: set up the ranks, the model, the optimizer and the data, then train and evaluate."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import get_model_config

from .. import runtime
from ..config import Config
from ..finalize import resolve, with_optimizer_choice
from . import extensions
from .attention_transfer import AttentionTransfer
from .batches import MockTokens, micro_batches
from .signals import StopConditions
from .model_setup import build_ddp_model_chunks
from .optim import build_optimizer, build_scheduler
from .step import evaluate, train_step
from .tracker import RunLogger


@dataclass
class RunState:
    """Where a run stands; what a checkpoint restores besides weights and optimizer state."""

    iteration: int = 0
    consumed_samples: int = 0
    history: List[dict] = field(default_factory=list)  # per-step metrics (without tau values)
    skipped_steps: int = 0  # steps whose update was refused (non-finite loss or gradient norm)
    stop_reason: Optional[str] = None  # why the run stopped before train_iters (signal, exit limits)
    phase: str = "setup"  # what the run was doing, for error messages


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row). The message says what to do."""


def build_datasets(cfg: Config, tokenizer=None):
    """(train, valid) map-style datasets of {"tokens", "labels", "loss_mask"} items. `tokenizer`: the one the
    data was made with, loaded from --tokenizer-model if not given."""
    t, m = cfg.train, cfg.model
    n_train = t.train_iters * t.global_batch_size
    n_valid = (t.train_iters // max(t.eval_interval, 1) + 1) * t.eval_iters * t.global_batch_size
    if cfg.data.mock_data:
        return (MockTokens(m.vocab_size, m.seq_length, n_train, seed=t.seed),
                MockTokens(m.vocab_size, m.seq_length, n_valid, seed=t.seed + 1))
    from ..data.datasets import build_gpt_datasets, require_train_and_valid  # needs files on disk
    from ..data.tokenizer import load_tokenizer

    require_train_and_valid(cfg.data.split)
    train, valid, _ = build_gpt_datasets(
        cfg.data.data_path, cfg.data.split, m.seq_length, t.seed, tokenizer or load_tokenizer(cfg.data.tokenizer_model),
        (n_train, n_valid, 0), cfg.data.data_cache_path, node_local_cache=cfg.data.data_cache_node_local,
        create_attention_mask=False)
    return train, valid


def data_iterators(cfg: Config, dataset, consumed_samples: int, num_chunks: int) -> list:
    """One iterator per model chunk, each over the same micro-batches (interleaving pulls them per chunk)."""
    return [
        micro_batches(dataset, consumed_samples=consumed_samples, micro_batch_size=cfg.train.micro_batch_size,
                      global_batch_size=cfg.train.global_batch_size,
                      dp_rank=parallel_state.get_data_parallel_rank(),
                      dp_size=parallel_state.get_data_parallel_world_size(), device=runtime.device())
        for _ in range(num_chunks)
    ]


def setup_run(cfg: Config):
    """Process groups, model chunks (DDP-wrapped), optimizer and scheduler for this rank. `cfg`: a resolved
    configuration (finalize.resolve: its vocabulary known); the optimizer is the one finalize chooses for it."""
    cfg = with_optimizer_choice(cfg)
    p = cfg.parallel
    runtime.init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                              p.virtual_pipeline_model_parallel_size, p.distributed_backend,
                              p.distributed_timeout_minutes, cfg.train.seed)
    model = build_ddp_model_chunks(cfg)
    extensions.attach(model, [AttentionTransfer.from_config(cfg, model)])  # the step's extensions, from the config
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    mcfg = get_model_config(model[0])
    mcfg.grad_scale_func = optimizer.scale_loss
    mcfg.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, scheduler


def train(cfg: Config, state: Optional[RunState] = None, *, tokenizer=None) -> RunState:
    """Train for cfg.train.train_iters iterations. Returns the run state with per-step metrics.

    cfg: a checked configuration (finalize.finalize's); it is resolved into a copy (finalize.resolve), never
    changed. tokenizer: the one finalize loaded, handed on to the datasets (loaded here if not given)."""
    from ..checkpoint import load_checkpoint, load_model_weights, save_checkpoint
    from .batches import valid_consumed_samples

    run = resolve(cfg, tokenizer=tokenizer)
    cfg = run.cfg
    state = state if state is not None else RunState()
    model, optimizer, scheduler = setup_run(cfg)
    ck = cfg.checkpoint
    loaded = load_checkpoint(cfg, model, optimizer, scheduler) if ck.load else None
    if loaded is not None:  # resume: the full training state, data position included
        state.iteration, state.consumed_samples = loaded.iteration, loaded.consumed_samples
    elif ck.pretrained_checkpoint:  # weights only (finetune / frozen_lm)
        load_model_weights(ck.pretrained_checkpoint, model, cfg)
        optimizer.reload_model_params()
    train_ds, valid_ds = build_datasets(cfg, run.tokenizer)
    train_iters = data_iterators(cfg, train_ds, state.consumed_samples, len(model))
    valid_iters = data_iterators(cfg, valid_ds, valid_consumed_samples(cfg, state.iteration), len(model))
    logger = RunLogger(cfg)
    t = cfg.train
    saved_at = state.iteration if loaded is not None else None

    def save() -> None:
        nonlocal saved_at
        state.phase = f"checkpoint save at iteration {state.iteration}"
        save_checkpoint(cfg, state.iteration, state.consumed_samples, model, optimizer, scheduler)
        saved_at = state.iteration

    def run_eval() -> dict:
        state.phase = f"evaluation at iteration {state.iteration}"
        return evaluate(cfg, model, valid_iters, t.eval_iters)

    stop = StopConditions(t.exit_duration_in_mins, t.exit_interval)
    bad_in_a_row = 0
    try:
        if t.eval_at_start and state.iteration == 0:
            logger.evaluation(0, run_eval())
        while state.iteration < t.train_iters:
            state.phase = f"training step {state.iteration + 1}"
            metrics = train_step(cfg, model, optimizer, scheduler, train_iters)
            state.iteration += 1
            state.consumed_samples += t.global_batch_size
            logger.train_step(state.iteration, metrics)
            state.history.append({k: v for k, v in metrics.items() if k != "tau_values"})
            bad_in_a_row = 0 if metrics["update_successful"] else bad_in_a_row + 1
            if bad_in_a_row:
                state.skipped_steps += 1
                if bad_in_a_row >= t.max_nonfinite_steps:
                    raise TrainingError(
                        f"{bad_in_a_row} steps in a row (up to iteration {state.iteration}) had a non-finite loss or "
                        f"gradient norm and were skipped; stopping. The weights were never updated with them, and the "
                        f"last checkpoint ({saved_at if saved_at is not None else 'none'}) is clean: lower --lr, check "
                        "the data, or raise --max-nonfinite-steps")
            if t.eval_interval and state.iteration % t.eval_interval == 0 and state.iteration < t.train_iters:
                logger.evaluation(state.iteration, run_eval())
            if ck.save and ck.save_interval and state.iteration % ck.save_interval == 0:
                save()
            state.stop_reason = stop.check(state.iteration) if state.iteration < t.train_iters else None
            if state.stop_reason:
                logger.message(f"stopping after iteration {state.iteration}: {state.stop_reason}")
                break
        if ck.save and saved_at != state.iteration:
            save()
        if state.stop_reason is None:  # a preempted run has no time to spare
            final = run_eval()
            logger.evaluation(state.iteration, final)
            state.history.append({"final_eval": final})
        state.phase = "done"
    finally:
        stop.restore()
        logger.close()
    return state
