#!/usr/bin/env python
"""Show what is in an indexed dataset: counts, document-length histogram, a decoded document.

    python tools/inspect_dataset.py --prefix out/corpus_00000 [--tokenizer-model tok.model] [--doc 0]
    python tools/inspect_dataset.py --prefix out/corpus.manifest.json      # every shard of a manifest
    python tools/inspect_dataset.py --prefix out/corpus_00000 --json        # machine-readable

The file is checked first (a missing or truncated .bin, a bad .idx: a clear error). The tokenizer
defaults to the one recorded in the dataset's manifest / .meta.json.
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
    p.add_argument("--prefix", required=True, help="dataset prefix (without .bin/.idx) or a preprocess_data manifest")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer to decode with (default: the recorded one)")
    p.add_argument("--doc", type=int, default=0, help="index of the document to decode (-1: none)")
    p.add_argument("--max-chars", type=int, default=2000, help="print at most this much of the decoded document")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    args = p.parse_args(argv)
    from megatron_tempnet.data.indexed import dataset_stats, expand_data_prefixes, read_document, tokenizer_info_for

    prefixes = expand_data_prefixes([args.prefix])
    stats = [dataset_stats(pp) for pp in prefixes]
    tok_info = tokenizer_info_for(args.prefix) or tokenizer_info_for(prefixes[0])
    tok_path = args.tokenizer_model or (tok_info or {}).get("path")
    sample = None
    if args.doc >= 0:
        ids = read_document(prefixes[0], args.doc)
        sample = {"prefix": prefixes[0], "doc": args.doc, "tokens": int(ids.size), "ids_head": ids[:16].tolist()}
        if tok_path:
            from megatron_tempnet.data.tokenizer import load_tokenizer

            tok = load_tokenizer(tok_path)
            if ids.size and int(ids.max()) >= tok.vocab_size:
                print(f"warning: token id {int(ids.max())} >= vocab size {tok.vocab_size} of {tok_path}: wrong tokenizer?", file=sys.stderr)
            sample["text"] = tok.detokenize([int(i) for i in ids if int(i) < tok.vocab_size])[: args.max_chars]
    total = {
        "datasets": len(stats),
        "documents": sum(s["documents"] for s in stats),
        "sequences": sum(s["sequences"] for s in stats),
        "tokens": sum(s["tokens"] for s in stats),
        "dtype": sorted({s["dtype"] for s in stats}),
    }
    hist = {}
    for s in stats:
        for k, v in s["histogram"].items():
            hist[k] = hist.get(k, 0) + v
    order = sorted(hist, key=lambda k: (k != "0", int(k.strip("[)").split(",")[0]) if k != "0" else 0))
    hist = {k: hist[k] for k in order}
    if args.json:
        print(json.dumps({"total": total, "histogram": hist, "tokenizer": tok_info, "datasets": stats, "sample": sample}))
        return 0
    print(f"{args.prefix}: {total['datasets']} dataset(s), {total['documents']:,} documents, {total['sequences']:,} sequences, "
          f"{total['tokens']:,} tokens, dtype {', '.join(total['dtype'])}")
    if tok_info:
        print(f"tokenizer: {tok_info.get('path')} (vocab {tok_info.get('vocab_size')}, sha256 {str(tok_info.get('sha256'))[:12]})")
    if len(stats) == 1:
        dl = stats[0]["doc_length"]
        print(f"document length (tokens): min {dl['min']}, median {dl['median']:.0f}, mean {dl['mean']:.1f}, max {dl['max']}")
    if hist:
        print("document length histogram (tokens):")
        width = max(hist.values())
        for k, v in hist.items():
            print(f"  {k:>18} {v:>10,} {'#' * max(1, round(40 * v / width))}")
    if sample is not None:
        print(f"document {sample['doc']} of {sample['prefix']}: {sample['tokens']} tokens, ids {sample['ids_head']}...")
        if "text" in sample:
            print("-" * 60)
            print(sample["text"])
            print("-" * 60)
    return 0


if __name__ == "__main__":
    from megatron_tempnet.cli import run

    sys.exit(run(main))
