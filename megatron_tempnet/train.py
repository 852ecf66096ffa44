"""Entry point: `torchrun --nproc_per_node N -m megatron_tempnet.train --config CONFIG.yaml [flags]`.

Also installed as the console script `tempnet-train`. `--dry-run` checks the configuration, data, tokenizer, checkpoint and disk (tools/check_job.py) and exits.
"""
from __future__ import annotations

import sys
from typing import Optional

from . import platform
from .config import ConfigError, load_config, validate


def main(argv: Optional[list[str]] = None) -> int:
    from .data.cli import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()  # "Apex / Transformer Engine not installed" is expected on a CPU
    from .data.indexed import DatasetError
    from .data.tokenizer import TokenizerError
    from .training.loop import resolve_vocab_size, train

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
    try:
        train(cfg)
    finally:
        platform.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
