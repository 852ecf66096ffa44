"""Entry point: `torchrun --nproc_per_node N -m megatron_tempnet.train --config CONFIG.yaml [flags]`.

Also installed as the console script `tempnet-train`. `--dry-run` checks the configuration, data, tokenizer, checkpoint and disk (tools/check_job.py) and exits.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from . import platform
from .config import ConfigError, load_config, validate


def main(argv: Optional[list[str]] = None) -> int:
    from .training.signals import keep_early_stop_signals

    keep_early_stop_signals()  # before the slow imports and setup: a stop signal then must not kill the rank
    from .data.cli import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()  # "Apex / Transformer Engine not installed" is expected on a CPU
    from .data.indexed import DatasetError
    from .data.tokenizer import TokenizerError
    from .training.loop import RunState, TrainingError, resolve_vocab_size, train
    from .training.signals import StopConditions, clear_requeue_marker, leave_requeue_marker

    cfg, args = load_config(argv)
    env = platform.discover_env()
    try:
        resolve_vocab_size(cfg)
        validate(cfg, env.world_size, cuda_available=platform.use_cuda(),
                 te_available=platform.transformer_engine_available())
    except (ConfigError, DatasetError, TokenizerError) as err:
        if env.rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:  # the checks of tools/check_job.py, at the launcher's world size
        from .training.preflight import format_results, run_checks

        results = run_checks(cfg, env.world_size)
        if env.rank == 0:
            print(format_results(results))
        return 0 if all(r.ok for r in results) else 2
    if env.rank == 0:
        clear_requeue_marker(cfg.checkpoint.save)
    state = RunState()
    try:
        train(cfg, state)
        if StopConditions.exit_code(state.stop_reason) and cfg.checkpoint.save:  # see examples/slurm
            leave_requeue_marker(cfg.checkpoint.save, f"{state.stop_reason} at iteration {state.iteration}")
    except TrainingError as err:
        print(f"error: rank {env.rank}: {err}", file=sys.stderr, flush=True)
        return 1
    except Exception as err:  # a collective that timed out or lost its peer: say where, then stop
        if not _is_collective_failure(err):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: rank {env.rank} of {env.world_size}: a collective failed during {state.phase}: {first_line}. "
              f"Another rank probably died or stalled (see its log); the run stops here. Resume with --load from "
              f"the last published checkpoint{' in ' + cfg.checkpoint.save if cfg.checkpoint.save else ''}.",
              file=sys.stderr, flush=True)
        os._exit(1)  # skip teardown: destroying process groups with a dead peer can hang
    finally:
        if platform.dist_initialized():
            platform.destroy_distributed()
    code = StopConditions.exit_code(state.stop_reason)
    if state.stop_reason and env.rank == 0:
        print(f"stopped early ({state.stop_reason}) at iteration {state.iteration}; exit status {code}", flush=True)
    return code


def _is_collective_failure(err: BaseException) -> bool:
    """torch.distributed errors: a timeout (gloo/NCCL) or a peer that went away."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        k in text for k in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                            "NCCL", "gloo", "Broken pipe"))


if __name__ == "__main__":
    sys.exit(main())
