"""Where a run executes, split by job:

- launch.py: the rank layout from torchrun's or SLURM's environment;
- devices.py: CUDA or CPU, and Transformer Engine's presence;
- cpu_compat.py: megatron-core adapted to a CPU (the one place that patches it);
- process_groups.py: torch.distributed and megatron-core's model-parallel groups.

The names below are the package's public API; callers write `from megatron_tempnet import runtime`.
"""
from .cpu_compat import adapt_megatron_core_for_cpu, foreach_l2_norm, foreach_scale, native_torch, pipeline_p2p_config
from .devices import device, transformer_engine_available, use_cuda
from .launch import DistEnv, discover_env, free_port
from .process_groups import destroy_distributed, dist_initialized, init_distributed

__all__ = ["DistEnv", "adapt_megatron_core_for_cpu", "destroy_distributed", "device", "discover_env",
           "dist_initialized", "foreach_l2_norm", "foreach_scale", "free_port", "init_distributed", "native_torch",
           "pipeline_p2p_config", "transformer_engine_available", "use_cuda"]
