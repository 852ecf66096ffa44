#!/usr/bin/env python
"""Concatenate indexed datasets (.bin/.idx) into one, in the order given.

    python tools/merge_datasets.py --input out/corpus_00000 out/corpus_00001 --output-prefix out/corpus_all
    python tools/merge_datasets.py --input out/corpus.manifest.json --output-prefix out/corpus_all
    python tools/merge_datasets.py --input-dir out/ --output-prefix merged/all   # every prefix in the folder, sorted

Uses megatron-core's IndexedDatasetBuilder.add_index. Inputs are checked first (complete .bin, same
token dtype, same tokenizer when recorded); the output is written to temporary names and renamed when
complete, with a <output>.meta.json beside it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tempnet.cli_help import HelpFormatter  # noqa: E402  (after the path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--input", nargs="+", help="dataset prefixes (or preprocess_data manifests), merged in this order")
    g.add_argument("--input-dir", help="merge every dataset (*.idx) in this folder, in sorted order")
    p.add_argument("--output-prefix", required=True, help="the merged dataset: writes PREFIX.bin, PREFIX.idx, "
                   "PREFIX.meta.json")
    args = p.parse_args(argv)
    from megatron_tempnet.data.indexed import DatasetError, merge_datasets

    if args.input_dir:
        inputs = sorted(f[:-4] for f in glob.glob(os.path.join(args.input_dir, "*.idx")))
        if not inputs:
            raise DatasetError(f"no datasets (*.idx) in {args.input_dir}")
    else:
        inputs = args.input
    info = merge_datasets(inputs, args.output_prefix)
    print(json.dumps({k: info[k] for k in ("prefix", "dtype", "documents", "sequences", "tokens", "bin_bytes")}))
    return 0


if __name__ == "__main__":
    from megatron_tempnet.cli import run

    sys.exit(run(main))
