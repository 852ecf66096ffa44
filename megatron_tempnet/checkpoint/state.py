"""The state dict a checkpoint stores: model chunks, optimizer, scheduler, per-rank RNG and plain values.

What is stored how (megatron-core's `torch_dist` format: global tensors, so a checkpoint saved at one
TP/PP/DP layout loads at another):
- model and optimizer tensors as ShardedTensors, one model chunk under "model" (or "model0", "model1", ...
  with virtual pipeline stages). Each module says how it is sharded (its `sharded_state_dict`); TempNet's
  W1 is split by TP along the vocabulary, the rest of TempNet replicated (models/tempnet.py). The padded
  vocabulary does not depend on TP, so the embedding, the output layer and W1 reshard like everything else.
- the distributed optimizer in its "fully_reshardable" form, which stores the same global tensors as the
  plain optimizer, so either kind loads the other's (optimizer_state.py);
- each rank's RNG states (torch CPU and CUDA generators, Python, NumPy, megatron-core's CUDA RNG tracker)
  as a ShardedObject "rng_state" indexed by (PP, TP, DP) rank, as Megatron-LM does;
- in common.pt (plain values): the scheduler state, "iteration", "consumed_samples", "layout"
  ({"tp", "pp", "dp", "world", "vpp"}), "config_json" (the run's Config.to_dict() as JSON) and
  "format_version".
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..models.build import unwrap
from .optimizer_state import DISTRIB_OPTIM_SHARDING, init_distributed_optimizer_state


def sharded_state_dict_metadata() -> dict:
    """The `metadata` megatron-core's sharded_state_dict methods take, for how this project saves and loads."""
    from megatron.core import parallel_state

    return {
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
        "distrib_optim_sharding_type": DISTRIB_OPTIM_SHARDING,
        "chained_optim_avoid_prefix": True,
        "singleton_local_shards": False,
    }


def model_sharded_state_dict(chunk: torch.nn.Module, metadata: Optional[dict] = None) -> dict:
    """One model chunk's sharded state dict, keys without the DDP wrapper's "module." prefix."""
    return unwrap(chunk).sharded_state_dict(prefix="", metadata=metadata or sharded_state_dict_metadata())


def model_key(i: int, n: int) -> str:
    """The state-dict key of model chunk i of n."""
    return "model" if n == 1 else f"model{i}"


def parallel_layout() -> dict:
    """{"tp", "pp", "dp", "world"}: this run's sizes, as stored in a checkpoint."""
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "world": dist.get_world_size()}


def _rng_state() -> dict:
    """This rank's RNG states as tensors and plain values (loadable with weights_only=True)."""
    from megatron.core import tensor_parallel

    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    return state


def set_rng_state(state: dict) -> None:
    """Restore this rank's RNG states from what `training_state_dict` stored."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data: Any, layout: dict):
    """Per-rank RNG states: one ShardedObject per (PP, TP, DP) rank, as Megatron-LM stores them."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (layout["pp"], layout["tp"], layout["dp"]),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                          ps.get_data_parallel_rank()), replica_id=0)


def training_state_dict(model: List[torch.nn.Module], optimizer, scheduler, *, is_loading: bool, with_rng: bool,
                        layout: dict) -> dict:
    """The sharded state dict of a training state (the template to load into, with `is_loading`)."""
    metadata = sharded_state_dict_metadata()
    sd: Dict[str, Any] = {}
    for i, chunk in enumerate(model):
        sd[model_key(i, len(model))] = model_sharded_state_dict(chunk, metadata)
    if optimizer is not None:
        if is_loading:
            init_distributed_optimizer_state(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=metadata)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    if with_rng:
        sd["rng_state"] = _rng_sharded_object(None if is_loading else _rng_state(), layout)
    return sd
