#!/usr/bin/env python
"""Preprocessing throughput and memory: generate a synthetic JSONL corpus, tokenize it, print one JSON line.

    python benchmarks/preprocess.py                      # 1 GB (1024 MB) corpus, all cores
    python benchmarks/preprocess.py --size-mb 50 --workers 2

Steps: (1) write a deterministic synthetic JSONL of --size-mb MB (Zipf-distributed pseudo-words, prose
and code-like lines, some non-ASCII) to --workdir; (2) train a sentencepiece tokenizer on its first
--tokenizer-sample-mb MB (tools/train_tokenizer.py), unless --tokenizer is given; (3) run
tools/preprocess_data.py on it as a separate process and measure that process tree.

Figures: docs/s, MB/s (input bytes), tokens/s of the preprocessing run; peak RSS of its process tree:
getrusage ru_maxrss of the main process (RUSAGE_SELF) and of its largest worker (RUSAGE_CHILDREN), and
the peak of the summed RSS of all processes of the tree, sampled every 0.2 s (an upper bound: pages
shared between processes count once per process). "peak_rss_mb" is the larger of that sum and
self + children; the goal is < 1024 MB for a 1 GB corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_lexicon(rng: np.random.Generator, n: int = 30000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
    freq = freq / freq.sum()
    lengths = np.clip(rng.poisson(5.0, n) + 1, 1, 14)
    words = []
    for L in lengths:
        words.append("".join(rng.choice(letters, L, p=freq)))
    extras = ["é", "ü", "ß", "naïve", "café", "日本", "数据", "Ω", "—", "🙂"]
    for i, e in enumerate(extras):
        words[(i * 997) % n] = e
    return np.array(words, dtype=object)


def generate_jsonl(path: str, size_mb: float, seed: int = 0) -> dict:
    """Deterministic synthetic corpus of about size_mb MB (1 MB = 1e6 bytes)."""
    rng = np.random.default_rng(seed)
    lex = make_lexicon(rng)
    ranks = np.arange(1, len(lex) + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    cdf = np.cumsum(p)
    target = int(size_mb * 1e6)
    written = docs = 0
    punct = np.array([" ", " ", " ", " ", " ", " ", ", ", ". ", ".\n", "\n", " = ", "(", ") ", ": "], dtype=object)
    t0 = time.time()
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n_words = int(np.clip(rng.lognormal(6.0, 0.8), 8, 20000))
            idx = np.searchsorted(cdf, rng.random(n_words))
            idx = np.minimum(idx, len(lex) - 1)
            seps = punct[rng.integers(0, len(punct), n_words)]
            parts = np.empty(2 * n_words, dtype=object)
            parts[0::2] = lex[idx]
            parts[1::2] = seps
            text = "".join(parts.tolist())
            if docs % 7 == 0:  # code-like documents: indentation matters
                text = "\n".join(("    " * (i % 3)) + line for i, line in enumerate(text.split("\n")))
            line = json.dumps({"text": text, "id": docs}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return {"path": path, "bytes": written, "docs": docs, "seconds": round(time.time() - t0, 2)}


def tree_rss_sampler(pid: int, stop: threading.Event, out: dict, interval: float = 0.2) -> None:
    import psutil

    peak = 0
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for pr in procs:
            try:
                total += pr.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peak = max(peak, total)
        out["peak_tree_rss"] = peak
        stop.wait(interval)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1024.0, help="size of the generated JSONL (MB)")
    ap.add_argument("--workers", type=int, default=0, help="preprocessing workers (default: all cores)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--tokenizer", default=None, help="an existing tokenizer instead of training one")
    ap.add_argument("--tokenizer-sample-mb", type=float, default=20.0)
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary folder, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(workdir, exist_ok=True)
    try:
        corpus = os.path.join(workdir, f"synthetic_{args.size_mb:g}mb.jsonl")
        if os.path.isfile(corpus) and os.path.isfile(corpus + ".done"):
            gen = json.load(open(corpus + ".done"))
        else:
            gen = generate_jsonl(corpus, args.size_mb, args.seed)
            json.dump(gen, open(corpus + ".done", "w"))
        print(f"[bench] corpus {gen['bytes'] / 1e6:.1f} MB, {gen['docs']} docs ({gen['seconds']} s)", file=sys.stderr)

        tok_seconds = 0.0
        tok = args.tokenizer
        if tok is None:
            prefix = os.path.join(workdir, f"tok_{args.vocab_size}")
            tok = prefix + ".model"
            if not os.path.isfile(tok):
                t0 = time.time()
                subprocess.run(
                    [sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus,
                     "--model-prefix", prefix, "--vocab-size", str(args.vocab_size),
                     "--max-input-mb", str(args.tokenizer_sample_mb)],
                    check=True, stdout=subprocess.DEVNULL,
                )
                tok_seconds = round(time.time() - t0, 2)
                print(f"[bench] tokenizer trained ({tok_seconds} s)", file=sys.stderr)

        out_prefix = os.path.join(workdir, "out", "synthetic")
        stats_file = os.path.join(workdir, "stats.json")
        cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus,
               "--tokenizer-model", tok, "--output-prefix", out_prefix, "--append-eod", "--force",
               "--shards", str(args.shards), "--stats-json", stats_file, "--log-skips", "0"]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        stop = threading.Event()
        sampled: dict = {}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        th = threading.Thread(target=tree_rss_sampler, args=(proc.pid, stop, sampled), daemon=True)
        th.start()
        rc = proc.wait()
        stop.set()
        th.join()
        if rc != 0:
            print(f"[bench] preprocess_data failed with exit status {rc}", file=sys.stderr)
            return rc
        st = json.load(open(stats_file))
        tree_mb = round(sampled.get("peak_tree_rss", 0) / 2**20, 1)
        peak = max(tree_mb, st["peak_rss_self_mb"] + st["peak_rss_children_mb"])
        result = {
            "benchmark": "preprocess",
            "input_mb": round(gen["bytes"] / 1e6, 1),
            "docs": st["docs"],
            "tokens": st["tokens"],
            "workers": st["workers"],
            "shards": st["shards"],
            "dtype": st["dtype"],
            "seconds": st["seconds"],
            "docs_per_s": st["docs_per_s"],
            "mb_per_s": st["mb_per_s"],
            "tokens_per_s": st["tokens_per_s"],
            "peak_rss_self_mb": st["peak_rss_self_mb"],
            "peak_rss_children_mb": st["peak_rss_children_mb"],
            "peak_rss_tree_sum_mb": tree_mb,
            "peak_rss_mb": peak,
            "under_1gb": peak < 1024,
            "cpus": os.cpu_count(),
            "generate_seconds": gen["seconds"],
            "tokenizer_seconds": tok_seconds,
        }
        print(json.dumps(result))
        return 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
