"""Step extensions: work the training step runs besides the model, through three hooks.

An extension (e.g. attention transfer, training/attention_transfer.py) subclasses `StepExtension` and
overrides the hooks it needs; every hook's default does nothing. training/step.py calls them, for every
extension in order, at these points of a training step (and of each evaluation batch):

  before_schedule(model, data_iterators, num_microbatches) -> data_iterators
      once per pipeline schedule, before megatron-core's forward(-backward) schedule runs over the global
      batch; returns the iterators the schedule reads (the same ones, or ones that replay the micro-batches
      the hook took from them).
  before_forward(chunk, batch)
      per micro-batch and model chunk, just before the chunk's forward (chunk: the DDP-wrapped chunk that
      megatron-core's schedule passes; batch: training/batches.Batch).
  metrics(tokens) -> dict
      once per training step, or once per evaluation after all its batches: entries to add to the step's
      metrics, over what ran since the last call; `tokens` is the loss-masked token count of that span,
      summed over all ranks. It may be a collective: every rank calls it.

There is no loss hook: a term that belongs to a layer is backpropagated inside the model, on the pipeline
stage that computes it (as attention transfer's KL term does, models/explicit_attention.py).

training/loop.py's setup_run builds a run's extensions once from the config and `attach`es them to the model
chunks; the step finds them with `attached(model)`, so every caller of setup_run / train_step / evaluate (the
loop, the in-process trainer, the benchmarks) runs them without passing them around. They are kept outside
nn.Module's attributes: they are neither parameters nor buffers, and no optimizer, DDP or checkpoint sees them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..models.build import unwrap

_ATTR = "_step_extensions"


class StepExtension:
    """Base class of the step's extensions; override the hooks you need (see the module docstring)."""

    def before_schedule(self, model: List[torch.nn.Module], data_iterators: list, num_microbatches: int) -> list:
        return data_iterators

    def before_forward(self, chunk: torch.nn.Module, batch) -> None:
        pass

    def metrics(self, tokens: float) -> dict:
        return {}


def attach(model: List[torch.nn.Module], extensions: Sequence[Optional[StepExtension]]) -> None:
    """Make `extensions` the ones the training step runs for the chunks `model` (DDP-wrapped or not), in this
    order; None entries (an extension this run's config leaves off) are dropped."""
    kept = tuple(ext for ext in extensions if ext is not None)
    object.__setattr__(unwrap(model[0]), _ATTR, kept)  # not a submodule (see the module docstring)


def attached(model: List[torch.nn.Module]) -> Tuple[StepExtension, ...]:
    """The extensions attached to the chunks `model`; () when none were."""
    return getattr(unwrap(model[0]), _ATTR, ())
