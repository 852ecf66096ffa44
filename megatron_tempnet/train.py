"""Entry point: `torchrun --nproc_per_node N -m megatron_tempnet.train --config CONFIG.yaml [flags]`.

Also installed as the console script `tempnet-train`. `--dry-run` checks the configuration, data, tokenizer, checkpoint and disk (tools/check_job.py) and exits.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from . import runtime
from .config import ConfigError, load_config

_QUIET_RANK_GRACE_S = 3.0


def main(argv: Optional[list[str]] = None) -> int:
    from .training.signals import keep_early_stop_signals

    keep_early_stop_signals()  # before the slow imports and setup: a stop signal then must not kill the rank
    from .cli import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()  # "Apex / Transformer Engine not installed" is expected on a CPU
    from .finalize import build_parser, finalize
    from .training.loop import RunState, train
    from .training.preflight import check_save_folder
    from .training.signals import REQUEUE_EXIT_CODE, StopConditions, clear_requeue_marker, leave_requeue_marker

    env = runtime.discover_env()
    user_errors = _user_error_types()
    try:
        cfg, args = load_config(argv, parser=build_parser())
        run = finalize(cfg, env.world_size, cuda_available=runtime.use_cuda(),
                       te_available=runtime.transformer_engine_available())
        cfg = run.cfg
        if not args.dry_run:
            check_save_folder(cfg, copies=1)  # before any step: a run that cannot save must not train
    except user_errors as err:
        _report(env.rank, err)
        return 2
    if args.dry_run:  # the checks of tools/check_job.py, at the launcher's world size
        from .training.preflight import format_results, run_checks

        results = run_checks(cfg, env.world_size, tokenizer=run.tokenizer)
        if env.rank == 0:
            print(format_results(results))
        return 0 if all(r.ok for r in results) else 2
    if env.rank == 0:
        clear_requeue_marker(cfg.checkpoint.save)
    state = RunState()
    try:
        train(cfg, state, tokenizer=run.tokenizer)
        # for launchers that hide the exit status (torchrun): see examples/slurm; Ctrl-C (130) asks for no requeue
        if StopConditions.exit_code(state.stop_reason) == REQUEUE_EXIT_CODE and cfg.checkpoint.save:
            leave_requeue_marker(cfg.checkpoint.save, f"{state.stop_reason} at iteration {state.iteration}")
    except user_errors as err:  # raised identically on every rank (data, split, tokenizer, checkpoint, ...)
        _report(env.rank, err)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C (training/signals.py): stop now, without saving
        if env.rank == 0:
            print(f"error: interrupted during {state.phase}; nothing was saved since the last checkpoint"
                  f"{' in ' + cfg.checkpoint.save if cfg.checkpoint.save else ''}", file=sys.stderr, flush=True)
        return 130
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
        if runtime.dist_initialized():
            runtime.destroy_distributed()
    code = StopConditions.exit_code(state.stop_reason)
    if state.stop_reason and env.rank == 0:
        print(f"stopped early ({state.stop_reason}) at iteration {state.iteration}; exit status {code}", flush=True)
    return code


def _user_error_types() -> tuple:
    """Errors whose message names the problem and the fix: reported as one line, never as a traceback."""
    from .data.indexed import DatasetError
    from .data.tokenizer import TokenizerError
    from .training.loop import TrainingError

    return (ConfigError, DatasetError, TokenizerError, TrainingError)


def _report(rank: int, err: BaseException) -> None:
    """One line on rank 0 (every rank raises the same error; N copies of it say nothing more). Under torchrun
    the line also goes into the worker's error file, so that torchrun's own failure summary (which it always
    prints) names the problem as its root cause instead of "To enable traceback see ..."."""
    if rank != 0:
        # Let rank 0 speak first: a launcher that sees this rank end stops the others (torchrun sends SIGTERM),
        # which could cut rank 0 off before its line is out.
        time.sleep(_QUIET_RANK_GRACE_S)
        return
    line = "error: " + " ".join(str(err).split())
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,  # torchrun's format
                                                                  "timestamp": str(int(time.time()))}}}, f)


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
