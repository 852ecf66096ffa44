#!/usr/bin/env python
r"""Tokenize JSONL / text corpora into sharded Megatron indexed datasets (.bin/.idx).

    python tools/preprocess_data.py --input data/ corpus.jsonl.gz --json-keys text \
        --tokenizer-model tok.model --output-prefix out/corpus --append-eod --workers 8 --shards 4
    # -> out/corpus_00000.{bin,idx,meta.json} ... out/corpus_00003.*, out/corpus.manifest.json

Inputs: .jsonl/.json/.ndjson (one JSON object per line) and plain text files, each optionally .gz,
or folders of them (recursed in sorted order). Plain text files are one document each (--text-mode
file) or one per line (--text-mode line). With several --json-keys, each key gets its own datasets
(<prefix>_<key>_<shard>).

Output: tokens as uint16 when the vocabulary fits (<= 65536 ids), else int32 (--dtype to force).
Sharding: --shards N (N contiguous ranges of input records), --docs-per-shard K, or
--shard-size-mb M; the assignment depends only on the input order, so neither --workers nor
--tokenizer-backend changes the output. The manifest <prefix>.manifest.json records inputs, tokenizer (path, sha256, vocab size),
dtype, counts (docs, tokens, skipped by reason) and the shards; pass it (or the shard prefixes) as
--data-path to training.

Bad records are skipped and counted (malformed JSON, invalid UTF-8, missing key, non-string value,
empty text); --strict stops at the first one instead, naming the file and line. Completed shards
survive any failure; rerunning the same command resumes after them (--force starts over).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tempnet.cli_help import HelpFormatter  # noqa: E402  (after the path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL / text files (optionally .gz) or folders of them")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (default: text)")
    p.add_argument("--text-mode", choices=["file", "line"], default="file", help="plain text files: one document per file (default) or per line")
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file or Hugging Face tokenizer folder")
    p.add_argument("--output-prefix", required=True, help="output path prefix: PREFIX_00000.bin/.idx ..., PREFIX.manifest.json")
    p.add_argument("--append-eod", action="store_true", help="append the tokenizer's end-of-document id to every document")
    p.add_argument("--workers", type=int, default=0, help="tokenizer threads (default: all cores)")
    p.add_argument("--tokenizer-backend", choices=["auto", "sentencepiece", "hf", "gigatoken"], default="auto",
                   help="library that encodes: auto (gigatoken when installed and it reads the model, else the "
                        "reference: sentencepiece for .model files, hf for tokenizer.json); every backend gives "
                        "the reference's ids, checked on the first documents")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shards", type=int, default=None, help="split the output into N shards of contiguous input records (default 1)")
    g.add_argument("--docs-per-shard", type=int, default=None, help="a new shard every K input records")
    g.add_argument("--shard-size-mb", type=float, default=None, help="close a shard once its .bin reaches M MB")
    p.add_argument("--dtype", choices=["auto", "uint16", "int32"], default="auto", help="token dtype (auto: uint16 if the vocabulary fits)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (file:line) instead of skipping it")
    p.add_argument("--force", action="store_true", help="ignore shards completed by an earlier run and start over")
    p.add_argument("--no-verify-existing", dest="verify_existing", action="store_false", help="trust completed shards by size only (skip re-hashing)")
    p.add_argument("--log-skips", type=int, default=5, help="describe at most this many skipped records on stderr")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--chunk-mb", type=float, default=2.0, help="input read, parsed and encoded per batch (MB)")
    p.add_argument("--stats-json", default=None, help="also write the run's throughput and peak RSS as JSON to this file")
    return p.parse_args(argv)


def peak_rss_mb() -> dict:
    """Peak resident set sizes (MB): this process, and the largest of its waited-for child processes."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_self_mb": round(self_kb / 1024, 1), "peak_rss_children_mb": round(child_kb / 1024, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_tempnet.data.preprocess import PreprocessConfig, preprocess

    cfg = PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer_model,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        shards=args.shards,
        docs_per_shard=args.docs_per_shard,
        shard_size_mb=args.shard_size_mb,
        dtype=args.dtype,
        text_mode=args.text_mode,
        strict=args.strict,
        force=args.force,
        verify_existing=args.verify_existing,
        progress=not args.quiet,
        log_skips=args.log_skips,
        chunk_bytes=int(args.chunk_mb * 1e6),
        tokenizer_backend=args.tokenizer_backend,
    )
    man = preprocess(cfg)
    run = man.pop("run")
    c = man["counts"]
    summary = {
        "manifest": args.output_prefix + ".manifest.json",
        "shards": len(man["shards"]),
        "dtype": man["dtype"],
        "records": c["records"],
        "docs": c["docs"],
        "tokens": c["tokens"],
        "skipped": c["skipped"],
        **run,
        **peak_rss_mb(),
    }
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(summary, f)
    print(json.dumps(summary))
    if c["docs"] == 0:
        print("error: no documents were written: every record was skipped (see 'skipped'); check --json-keys and the inputs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from megatron_tempnet.cli import run

    sys.exit(run(main))
