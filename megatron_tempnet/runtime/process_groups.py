"""torch.distributed and megatron-core's model-parallel process groups: NCCL on GPUs, gloo on a CPU."""
from __future__ import annotations

import datetime
from typing import Optional

import torch
import torch.distributed as dist

from .cpu_compat import adapt_megatron_core_for_cpu
from .devices import use_cuda
from .launch import DistEnv, discover_env


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    backend: str = "auto",
    timeout_minutes: int = 10,
    seed: int = 1234,
) -> DistEnv:
    """Start torch.distributed and megatron-core's model-parallel groups, and seed every RNG.

    Seeds: the CPU generator gets `seed` (so model initialisation is the same on every rank; with
    megatron-core's CPU initialisation each rank takes its slice of one full weight), and CUDA's
    model-parallel tracker gets megatron-core's per-TP-rank seeds.
    """
    from megatron.core import parallel_state, tensor_parallel

    env = discover_env()
    if backend == "auto":
        backend = "nccl" if use_cuda() else "gloo"
    if use_cuda():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        adapt_megatron_core_for_cpu()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not use_cuda(), force_reset_rng=True)
    return env


def dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
