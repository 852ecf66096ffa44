"""This rank's model chunks (models/build.py) wrapped in megatron-core DDP for training."""
from __future__ import annotations

from typing import List

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from ..config import Config
from ..models.build import build_model_chunks


def build_ddp_model_chunks(cfg: Config) -> List[DistributedDataParallel]:
    """models.build.build_model_chunks(cfg), each chunk in megatron-core DDP (gradients reduced in fp32;
    the distributed optimizer's layout when cfg.parallel.use_distributed_optimizer)."""
    chunks = build_model_chunks(cfg)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]
