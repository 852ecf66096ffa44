#!/usr/bin/env python
"""Preprocessing against the tokenizer alone: raw encode rate of every installed backend, our end-to-end
rate with each, the ratios, and whether every backend wrote the same bytes. One JSON line per row.

    python benchmarks/preprocess.py --corpus /work/corpus/debian_docs.jsonl --workers 2 \\
        --tokenizer /work/corpus/tok/sp8k.model --tokenizer /work/corpus/tok/bpe16k
    python benchmarks/preprocess.py --corpus C.jsonl --tokenizer T --rss-scale 5   # + peak RSS on 5 x the corpus

The corpus is any JSONL with a "text" field (benchmarks/text_corpus.py builds a 126 MB one from Debian
documentation packages); --build-corpus builds it first if it is missing.

Rows, for each tokenizer and each backend that can run it (sentencepiece or hf: the reference library;
gigatoken), interleaved, --repeats times:
  raw   the backend alone on the corpus's texts already in memory, --workers threads, no I/O:
        sentencepiece encode(list, num_threads=W); gigatoken encode_batch_list(list, parallel=True);
        tokenizers encode_batch_fast(list). MB = UTF-8 bytes of the texts.
  e2e   tools/preprocess_data.py --workers W --tokenizer-backend B --append-eod --shards S as its own
        process: MB/s over the input file's bytes, timed from the start of preprocess() to the last
        manifest write ("seconds"; reading, parsing, the record pre-pass, tokenizing, writing, hashing,
        fsync), and over the whole process ("wall", interpreter start and imports included); peak RSS of
        the process tree (getrusage, and the summed RSS of the tree sampled every 0.2 s).
Then per tokenizer: the best of the repeats for each row, e2e/raw ratios, and "identical": the sha256 of
every .bin/.idx and of the manifest's counts are equal across backends. `uptime`'s load is printed with
every row: figures taken while other work shares the cores are noisy.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load() -> str:
    return open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"


def emit(row: dict) -> None:
    print(json.dumps({**row, "load1": load()}), flush=True)


def read_texts(corpus: str, key: str = "text") -> list:
    out = []
    with open(corpus, "rb") as f:
        for line in f:
            try:
                t = json.loads(line)[key]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(t, str) and t.strip():
                out.append(t)
    return out


def backends_for(tok_path: str) -> list:
    """The reference library for the tokenizer's format, then gigatoken if it is installed. Decided from
    the path alone: loading a tokenizer (transformers) here would enlarge this process, and a child's peak
    RSS counts the parent's pages it was forked from."""
    p = tok_path.rstrip("/")
    ref = "hf" if os.path.isdir(p) or p.endswith("tokenizer.json") else "sentencepiece"
    try:
        import gigatoken  # noqa: F401
    except ImportError:
        return [ref]
    return [ref, "gigatoken"]


def raw_encoders(tok, backend: str, workers: int) -> dict:
    """The backend's own batch calls, ids as the call returns them, no conversion: "list" (plain lists,
    as sentencepiece's encode(list, num_threads) gives them) and, for gigatoken, "arrays" (its numpy-backed
    encode_batch, what our pipeline calls)."""
    if backend == "sentencepiece":
        return {"list": lambda texts: tok._sp.encode(texts, num_threads=workers)}
    if backend == "hf":
        fast = tok._tok.backend_tokenizer
        return {"list": lambda texts: fast.encode_batch_fast(texts, add_special_tokens=False)}
    from megatron_tempnet.data.encoders import _load_gigatoken

    g = _load_gigatoken(tok)
    return {"list": lambda texts: g.encode_batch_list(texts, parallel=workers > 1),
            "arrays": lambda texts: g.encode_batch(texts, parallel=workers > 1)}


def raw_rate(corpus: str, tok_path: str, backend: str, workers: int, batch_mb: float, call: str, how: str) -> dict:
    """MB/s of text for one raw call, on the whole corpus in one call ("whole") or in consecutive batches of
    about batch_mb ("batched", as the pipeline feeds it). Runs in a fresh process (see run_raw): gigatoken
    keeps a cache of pretokens across calls, so a second measurement in one process would start warm."""
    from megatron_tempnet.data.tokenizer import load_tokenizer

    texts = read_texts(corpus)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    calls, cur, n = [], [], 0
    for t in texts if how == "batched" else ():
        cur.append(t)
        n += len(t)
        if n >= batch_mb * 1e6:
            calls.append(cur)
            cur, n = [], 0
    calls = calls + ([cur] if cur else []) if how == "batched" else [texts]
    fn = raw_encoders(load_tokenizer(tok_path), backend, workers)[call]
    t0, c0 = time.time(), cpu_seconds(resource.RUSAGE_SELF)
    for b in calls:
        fn(b)
    return {"text_mb": round(text_bytes / 1e6, 1), f"{call}_{how}_mb_per_s": round(text_bytes / (time.time() - t0) / 1e6, 2),
            f"{call}_{how}_cpu_s": round(cpu_seconds(resource.RUSAGE_SELF) - c0, 2)}


def cpu_seconds(who) -> float:
    """User + system CPU seconds of this process (all its threads) or of its waited-for children."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_raw(corpus: str, tok_path: str, backend: str, workers: int, batch_mb: float) -> dict:
    """Every raw call of the backend, each in a fresh process (cold caches, and the texts and ids never
    enlarge this process); the fastest is "best"."""
    calls = ["list", "arrays"] if backend == "gigatoken" else ["list"]
    out: dict = {}
    for call in calls:
        for how in ("whole", "batched"):
            cmd = [sys.executable, os.path.abspath(__file__), "--corpus", corpus, "--tokenizer", tok_path,
                   "--workers", str(workers), "--raw", backend, call, how, "--batch-mb", str(batch_mb)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAYON_NUM_THREADS=str(workers)))
            if r.returncode != 0:
                raise SystemExit(f"[bench] raw run failed: {r.stderr[-2000:]}")
            out.update(json.loads(r.stdout.strip().splitlines()[-1]))
    best = max((k for k in out if k.endswith("_mb_per_s")), key=out.get)
    out["best"], out["best_mb_per_s"], out["best_cpu_s"] = best, out[best], out[best.replace("_mb_per_s", "_cpu_s")]
    return out


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


def run_e2e(corpus: str, tok: str, backend: str, workers: int, shards: int, out_prefix: str) -> dict:
    stats_file = out_prefix + ".stats.json"
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus,
           "--tokenizer-model", tok, "--output-prefix", out_prefix, "--append-eod", "--force", "--quiet",
           "--shards", str(shards), "--workers", str(workers), "--tokenizer-backend", backend,
           "--stats-json", stats_file, "--log-skips", "0"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers))
    stop, sampled = threading.Event(), {}
    t0, c0 = time.time(), cpu_seconds(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    th = threading.Thread(target=tree_rss_sampler, args=(proc.pid, stop, sampled), daemon=True)
    th.start()
    rc = proc.wait()
    wall, cpu = time.time() - t0, cpu_seconds(resource.RUSAGE_CHILDREN) - c0
    stop.set()
    th.join()
    if rc != 0:
        raise SystemExit(f"[bench] preprocess_data failed with exit status {rc}: {' '.join(cmd)}")
    st = json.load(open(stats_file))
    man = json.load(open(out_prefix + ".manifest.json"))
    digest = hashlib.sha256()
    for s in man["shards"]:
        for d in s["datasets"].values():
            digest.update((d["bin_sha256"] + d["idx_sha256"]).encode())
    digest.update(json.dumps(man["counts"], sort_keys=True).encode())
    nbytes = os.path.getsize(corpus)
    return {
        "seconds": st["seconds"], "wall_seconds": round(wall, 3), "cpu_s": round(cpu, 2),
        "mb_per_s": round(nbytes / st["seconds"] / 1e6, 2), "wall_mb_per_s": round(nbytes / wall / 1e6, 2),
        "tokens": st["tokens"], "docs": st["docs"], "backend_used": st.get("tokenizer_backend"),
        "peak_rss_self_mb": st["peak_rss_self_mb"],
        "peak_rss_tree_mb": round(sampled.get("peak_tree_rss", 0) / 2**20, 1),
        "output_sha256": digest.hexdigest(),
    }


def bench_tokenizer(args, tok_path: str, workdir: str) -> None:
    backends = [b for b in backends_for(tok_path) if not args.backends or b in args.backends]
    best: dict = {}
    for rep in range(args.repeats):
        for b in backends:
            row = {"row": "raw", "tokenizer": tok_path, "backend": b, "repeat": rep, "workers": args.workers,
                   **run_raw(args.corpus, tok_path, b, args.workers, args.batch_mb)}
            emit(row)
            if ("raw", b) not in best or row["best_mb_per_s"] > best[("raw", b)]["best_mb_per_s"]:
                best[("raw", b)] = row
            r = run_e2e(args.corpus, tok_path, b, args.workers, args.shards, os.path.join(workdir, f"out_{b}", "c"))
            row = {"row": "e2e", "tokenizer": tok_path, "backend": b, "repeat": rep, "workers": args.workers, **r}
            emit(row)
            if ("e2e", b) not in best or row["mb_per_s"] > best[("e2e", b)]["mb_per_s"]:
                best[("e2e", b)] = row
    hashes = {b: best[("e2e", b)]["output_sha256"] for b in backends}
    for b in backends:
        raw, e2e = best[("raw", b)], best[("e2e", b)]
        emit({"row": "summary", "tokenizer": tok_path, "backend": b, "workers": args.workers,
              "raw_mb_per_s": raw["best_mb_per_s"], "raw_list_whole_mb_per_s": raw["list_whole_mb_per_s"],
              "e2e_mb_per_s": e2e["mb_per_s"], "e2e_wall_mb_per_s": e2e["wall_mb_per_s"],
              "e2e_over_raw": round(e2e["mb_per_s"] / raw["best_mb_per_s"], 3),
              "e2e_wall_over_raw": round(e2e["wall_mb_per_s"] / raw["best_mb_per_s"], 3),
              "raw_cpu_over_e2e_cpu": round(raw["best_cpu_s"] / e2e["cpu_s"], 3),
              "e2e_over_reference_e2e": round(e2e["mb_per_s"] / best[("e2e", backends[0])]["mb_per_s"], 2),
              "peak_rss_tree_mb": e2e["peak_rss_tree_mb"], "identical_across_backends": len(set(hashes.values())) == 1})


def bench_rss_scale(args, tok_path: str, workdir: str) -> None:
    """Peak RSS of one e2e run on the corpus and on --rss-scale copies of it back to back."""
    big = os.path.join(workdir, f"x{args.rss_scale}.jsonl")
    with open(big, "wb") as out:
        for _ in range(args.rss_scale):
            with open(args.corpus, "rb") as f:
                while True:
                    b = f.read(1 << 24)
                    if not b:
                        break
                    out.write(b)
    rows = {}
    for name, corpus in (("x1", args.corpus), (f"x{args.rss_scale}", big)):
        rows[name] = run_e2e(corpus, tok_path, "auto", args.workers, args.shards, os.path.join(workdir, f"rss_{name}", "c"))
        emit({"row": "rss", "corpus": name, "mb": round(os.path.getsize(corpus) / 1e6, 1), **rows[name]})
    a, b = rows["x1"]["peak_rss_tree_mb"], rows[f"x{args.rss_scale}"]["peak_rss_tree_mb"]
    emit({"row": "rss_summary", "scale": args.rss_scale, "peak_rss_x1_mb": a, f"peak_rss_x{args.rss_scale}_mb": b,
          "increase": round(b / a - 1, 3)})
    os.remove(big)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="JSONL with a 'text' field")
    ap.add_argument("--build-corpus", action="store_true", help="build --corpus with benchmarks/text_corpus.py if it is missing")
    ap.add_argument("--tokenizer", action="append", required=True, help="a .model file or tokenizer folder (repeatable)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-scale", type=int, default=0, help="also compare peak RSS on this many copies of the corpus")
    ap.add_argument("--workdir", default=None, help="where outputs go (default: a temporary folder)")
    ap.add_argument("--batch-mb", type=float, default=2.0, help="batch size of the batched raw rate (the pipeline's --chunk-mb)")
    ap.add_argument("--backends", nargs="*", default=None, help="only these backends (default: every one that runs)")
    ap.add_argument("--raw", nargs=3, default=None, help=argparse.SUPPRESS)  # internal: BACKEND CALL HOW, one raw measurement
    args = ap.parse_args(argv)
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # before any Rust tokenizer starts its pool
    if args.raw:
        print(json.dumps(raw_rate(args.corpus, args.tokenizer[0], args.raw[0], args.workers, args.batch_mb, *args.raw[1:])))
        return 0
    if args.build_corpus and not os.path.isfile(args.corpus):
        from benchmarks.text_corpus import build

        print(json.dumps(build(args.corpus)), file=sys.stderr)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_")
    emit({"row": "corpus", "path": args.corpus, "file_mb": round(os.path.getsize(args.corpus) / 1e6, 1),
          "cpus": os.cpu_count(), "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()})
    for tok in args.tokenizer:
        bench_tokenizer(args, tok, workdir)
    if args.rss_scale:
        bench_rss_scale(args, args.tokenizer[0], workdir)
    emit({"row": "end", "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
