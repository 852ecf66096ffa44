#!/usr/bin/env python
r"""Write the embedded default corpus: the Python standard library's own .py files, as JSONL.

    python tools/build_stdlib_corpus.py --output data/stdlib.jsonl \
        [--holdout-output data/stdlib_heldout.jsonl --holdout-fraction 0.02] [--include-tests]

Each line is {"text": <source>, "path": <path relative to the stdlib folder>}. Files are taken in
sorted order from sysconfig.get_paths()["stdlib"], without site-packages; test folders are left out
unless --include-tests. Held-out files are chosen by a hash of their path (stable across machines).
Nothing is downloaded. Then: tools/train_tokenizer.py and tools/preprocess_data.py on the output.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tempnet.cli_help import HelpFormatter  # noqa: E402  (after the path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--holdout-output", default=None, help="JSONL file for held-out documents")
    p.add_argument("--holdout-fraction", type=float, default=0.0, help="fraction of files held out (by path hash)")
    p.add_argument("--include-tests", action="store_true", help="also take the stdlib's test folders / test_*.py files")
    p.add_argument("--root", default=None, help="another source folder instead of this Python's stdlib")
    p.add_argument("--max-files", type=int, default=None, help="only the first N files (for quick trials)")
    args = p.parse_args(argv)
    from megatron_tempnet.data.corpus import write_stdlib_corpus

    if args.holdout_fraction and not args.holdout_output:
        p.error("--holdout-fraction needs --holdout-output")
    summary = write_stdlib_corpus(
        args.output,
        holdout_output=args.holdout_output,
        holdout_fraction=args.holdout_fraction,
        include_tests=args.include_tests,
        root=args.root,
        max_files=args.max_files,
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from megatron_tempnet.cli import run

    sys.exit(run(main))
