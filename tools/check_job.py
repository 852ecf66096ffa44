#!/usr/bin/env python
r"""Check a training job's inputs before it is queued (nothing is trained, no GPU is needed).

    python tools/check_job.py --world-size 16 --config examples/configs/tiny_llama.yaml \
        --tensor-model-parallel-size 2 --data-path data/corpus.manifest.json --tokenizer-model tok.model \
        --save ckpt/run1 --load ckpt/run1

Takes every flag of megatron_tempnet.train (below). Prints one line per check (config, tokenizer, data,
checkpoint, disk) and exits 1 if any fails; each failure names the problem and the fix.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    from megatron_tempnet.config import ConfigError, load_config
    from megatron_tempnet.finalize import build_parser
    from megatron_tempnet.cli import quiet_megatron_import_warnings
    from megatron_tempnet.training.preflight import format_results, run_checks

    quiet_megatron_import_warnings()
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--world-size", type=int, default=None,
                     help="ranks the job will run (nodes x GPUs per node) (default: $WORLD_SIZE, else 1)")
    parser = build_parser(parents=[own], prog="check_job.py", description=__doc__)
    try:
        cfg, args = load_config(argv, parser=parser)
    except ConfigError as err:
        print(f"FAIL config  {err}")
        return 1
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    results = run_checks(cfg, world)
    print(format_results(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
