"""save_checkpoint: the full training state of every rank as one `iter_N` folder, published atomically
(the folder layout and the publish protocol: folders.py; what the state holds: state.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ..config import Config
from .folders import (FORMAT, FORMAT_VERSION, iter_dir_name, prepare_temporary_folder, prune_checkpoints,
                      publish_checkpoint, temporary_folder)
from .integrity import record_checksums
from .state import parallel_layout, training_state_dict

# hook(iteration, stage, folder), called by every later save at the two points where a crash must leave the
# previous checkpoint loadable (see add_save_stage_hook).
SaveStageHook = Callable[[int, str, Path], None]
_stage_hooks: List[SaveStageHook] = []


def add_save_stage_hook(hook: SaveStageHook) -> Callable[[], None]:
    """Call `hook(iteration, stage, folder)` inside every later save, at stage "written" (on every rank: all
    files of the checkpoint are in its temporary folder `folder`, nothing is published) and "renamed" (on
    rank 0: the folder is renamed to `folder` = iter_N, the tracker file is not yet replaced). For tests
    that stop a run inside a save. Returns a function that removes the hook."""
    _stage_hooks.append(hook)
    return lambda: _stage_hooks.remove(hook)


def _reached(iteration: int, stage: str, folder: Path) -> None:
    for hook in list(_stage_hooks):
        hook(iteration, stage, folder)


def save_checkpoint(cfg: Config, iteration: int, consumed_samples: int, model: List[torch.nn.Module],
                    optimizer=None, scheduler=None, *, save_dir: Optional[str] = None,
                    keep_last: Optional[int] = None) -> Path:
    """Save the full training state of every rank as `save_dir/iter_N` (default --save) and publish it
    atomically; returns the folder. Called on every rank. Model-only checkpoints (optimizer and scheduler
    None) hold no RNG either; they start runs through --pretrained-checkpoint."""
    from megatron.core import dist_checkpointing

    root = Path(save_dir or cfg.checkpoint.save)
    keep = cfg.checkpoint.keep_last if keep_last is None else keep_last
    rank = dist.get_rank()
    layout = parallel_layout()
    layout["vpp"] = cfg.parallel.virtual_pipeline_model_parallel_size
    full = optimizer is not None
    t0 = time.perf_counter()
    tmp, final = temporary_folder(root, iteration), root / iter_dir_name(iteration)
    if rank == 0:
        prepare_temporary_folder(tmp)
    dist.barrier()

    sd = training_state_dict(model, optimizer, scheduler, is_loading=False, with_rng=full, layout=layout)
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "iteration": iteration,
        "consumed_samples": consumed_samples, "contents": ["model", "optimizer", "scheduler", "rng"] if full else ["model"],
        "layout": layout, "config": cfg.to_dict(),
    }
    sd.update(iteration=iteration, consumed_samples=consumed_samples, layout=layout,
              config_json=json.dumps(info["config"]), format_version=FORMAT_VERSION)
    dist_checkpointing.save(sd, str(tmp), validate_access_integrity=True)
    dist.barrier()
    record_checksums(tmp)  # collective; before the description file that publishes the folder
    _reached(iteration, "written", tmp)
    if rank == 0:
        publish_checkpoint(tmp, info, iteration, renamed=lambda folder: _reached(iteration, "renamed", folder))
        prune_checkpoints(root, keep, iteration)
        print(f"saved checkpoint {final} ({time.perf_counter() - t0:.1f} s)", flush=True)
    dist.barrier()
    return final
