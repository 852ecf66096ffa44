"""Tokenize a corpus into sharded Megatron indexed datasets (.bin/.idx), streaming, on all cores.

This is the library behind tools/preprocess_data.py; see that file for the command line.

Pipeline. The main process reads raw records (inputs.py) in chunks of a few hundred records / about a
megabyte, and hands the chunks to a pool of worker processes, which parse JSON, check UTF-8 and keys,
and tokenize. Results come back in input order (a window of at most `workers * prefetch` chunks is in
flight: memory is bounded whatever the corpus size) and the main process writes them through
megatron-core's IndexedDatasetBuilder.

Determinism. Which shard a document lands in depends only on its running record index in the input
(--shards N: N contiguous ranges of records, counted in a quick pre-pass; --docs-per-shard K: every K
records; --shard-size-mb M: a shard closes once its .bin files reach M MB), never on the number of
workers or on timing. So the output, and the manifest, are byte-identical for any --workers, and the
shards concatenated in order (tools/merge_datasets.py) equal the single-shard output.

Crash safety and resume. A shard is written to <prefix>.bin.tmp / <prefix>.idx.tmp, fsynced, and renamed
into place; then <prefix>.meta.json (the done marker: fingerprint of the run's settings, record range,
counts, sha256 of both files) is written atomically, and the manifest <output_prefix>.manifest.json is
rewritten. A rerun with the same settings keeps every shard whose marker matches its files (size and
sha256) and resumes reading at the input position recorded in the last one. An interrupted shard leaves
only .tmp files, which are never taken for data and are removed on the next run.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_tempnet.data import indexed as ix
from megatron_tempnet.data.inputs import (
    STRICT_REASONS,
    InputError,
    Position,
    SkipRecord,
    count_records,
    expand_inputs,
    input_fingerprint,
    is_jsonl,
    iter_records,
    parse_record,
)
from megatron_tempnet.data.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

FORMAT = "megatron-tempnet-preprocess"
FORMAT_VERSION = 1


@dataclass
class PreprocessConfig:
    inputs: List[str]
    output_prefix: str
    tokenizer: str
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 0  # 0: os.cpu_count()
    shards: Optional[int] = None  # exactly one of shards / docs_per_shard / shard_size_mb; default shards=1
    docs_per_shard: Optional[int] = None
    shard_size_mb: Optional[float] = None
    dtype: str = "auto"  # auto | uint16 | int32
    text_mode: str = "file"  # plain text files: "file" (one document each) or "line"
    strict: bool = False
    force: bool = False  # ignore completed shards of an earlier run
    verify_existing: bool = True  # re-hash completed shards before trusting them
    progress: bool = True
    log_skips: int = 5  # how many skipped records to describe on stderr
    chunk_records: int = 256
    chunk_bytes: int = 1 << 20
    prefetch: int = 4  # chunks in flight per worker


# ---------------------------------------------------------------------------------------------- workers

_W: dict = {}


def _init_worker(tokenizer_path: str, tokenizer_sha: str, keys, jsonl_by_file, dtype_name: str, append_eod: bool):
    # Never raise here: a Pool replaces a worker whose initializer fails, forever. Keep the error and
    # raise it from the first task instead, where the main process sees it.
    try:
        from megatron_tempnet.data.tokenizer import load_tokenizer as _load

        tok = _load(tokenizer_path)
        if tok.sha256 != tokenizer_sha:
            raise InputError(f"tokenizer {tokenizer_path} changed while preprocessing; do not overwrite it during a run")
        _W.update(
            tok=tok,
            keys=list(keys),
            jsonl=list(jsonl_by_file),
            dtype=np.dtype(dtype_name),
            eod=tok.eod if append_eod else None,
            vocab=tok.vocab_size,
            error=None,
        )
    except Exception as e:  # noqa: BLE001
        _W["error"] = e


def _process_chunk(chunk: List[Tuple[int, bytes]]):
    """chunk: [(file_index, raw_bytes)] in record order. Returns, for the chunk:
    ({key: (record_offsets int32, lengths int64, tokens dtype)}, [(record_offset, key|None, reason, detail)])."""
    if _W.get("error") is not None:
        raise _W["error"]
    keys, jsonl, dtype, eod = _W["keys"], _W["jsonl"], _W["dtype"], _W["eod"]
    texts = {k: [] for k in keys}
    where = {k: [] for k in keys}
    skips = []
    for off, (fi, raw) in enumerate(chunk):
        try:
            parsed = parse_record(raw, jsonl[fi], keys)
        except SkipRecord as s:
            skips.append((off, None, s.reason, s.detail))
            continue
        for k in keys:
            t = parsed[k]
            if isinstance(t, SkipRecord):
                skips.append((off, k, t.reason, t.detail))
            else:
                texts[k].append(t)
                where[k].append(off)
    out = {}
    limit = np.iinfo(dtype).max
    for k in keys:
        ids = _W["tok"].tokenize_batch(texts[k]) if texts[k] else []
        if eod is not None:
            for x in ids:
                x.append(eod)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
        if total and (flat.max() > limit or flat.min() < 0):
            raise InputError(
                f"token id {int(flat.max())} does not fit the output dtype {dtype.name}; use --dtype int32"
            )
        out[k] = (np.asarray(where[k], dtype=np.int32), lengths, flat.astype(dtype, copy=False))
    return out, skips


def _start_method() -> str:
    """spawn, unless the main module is a file that spawn cannot re-import (python - < script, exec)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is not None and not os.path.isfile(path) and "fork" in mp.get_all_start_methods():
        return "fork"
    return "spawn"


# ---------------------------------------------------------------------------------------------- writing


def shard_prefix(output_prefix: str, keys: Sequence[str], key: str, shard: int) -> str:
    if len(keys) > 1:
        return f"{output_prefix}_{key}_{shard:05d}"
    return f"{output_prefix}_{shard:05d}"


class _Shard:
    """One shard being written: one IndexedDatasetBuilder per key, to .tmp names."""

    def __init__(self, index: int, prefixes: Dict[str, str], dtype: np.dtype, start: Position):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.index = index
        self.prefixes = prefixes
        self.dtype = dtype
        self.start = start
        self.records = 0
        self.bytes = 0
        self.builders = {}
        self.hashes = {}
        self.counts = {k: {"docs": 0, "tokens": 0, "skipped": collections.Counter()} for k in prefixes}
        for k, p in prefixes.items():
            for stale in (ix.meta_path(p), p + ".bin.tmp", p + ".idx.tmp"):
                if os.path.exists(stale):
                    os.remove(stale)
            self.builders[k] = IndexedDatasetBuilder(p + ".bin.tmp", dtype=dtype.type)
            self.hashes[k] = hashlib.sha256()

    def add(self, key: str, tokens: np.ndarray) -> None:
        self.builders[key].add_document(tokens, [int(tokens.size)])
        self.hashes[key].update(tokens)
        c = self.counts[key]
        c["docs"] += 1
        c["tokens"] += int(tokens.size)
        self.bytes += tokens.nbytes

    def skip(self, key: Optional[str], reason: str) -> None:
        for k in self.counts if key is None else (key,):
            self.counts[k]["skipped"][reason] += 1

    def abort(self) -> None:
        for k, p in self.prefixes.items():
            try:
                self.builders[k].data_file.close()
            except Exception:
                pass
            for t in (p + ".bin.tmp", p + ".idx.tmp"):
                if os.path.exists(t):
                    os.remove(t)

    def finish(self, end: Position, common_meta: dict) -> dict:
        """Finalize, fsync, rename into place, write the .meta.json done marker. Returns the shard record."""
        datasets = {}
        for k, p in self.prefixes.items():
            b = self.builders[k]
            b.finalize(p + ".idx.tmp")
            for t in (p + ".bin.tmp", p + ".idx.tmp"):
                with open(t, "rb") as f:
                    os.fsync(f.fileno())
            c = self.counts[k]
            bin_bytes = os.path.getsize(p + ".bin.tmp")
            if bin_bytes != c["tokens"] * self.dtype.itemsize:
                raise RuntimeError(f"internal error: {p}.bin.tmp has {bin_bytes} bytes for {c['tokens']} tokens")
            # .bin first, then .idx: an .idx on disk always has its complete .bin beside it
            os.replace(p + ".bin.tmp", p + ".bin")
            os.replace(p + ".idx.tmp", p + ".idx")
            files = {
                "bin": {"bytes": bin_bytes, "sha256": self.hashes[k].hexdigest()},
                "idx": {"bytes": os.path.getsize(p + ".idx"), "sha256": ix.sha256_file(p + ".idx")},
            }
            counts = {"docs": c["docs"], "tokens": c["tokens"], "skipped": dict(sorted(c["skipped"].items()))}
            meta = dict(common_meta)
            meta.update(
                shard=self.index,
                key=k,
                records={"start": self.start.to_json(), "end": end.to_json()},
                counts=counts,
                files=files,
            )
            ix.write_json_atomic(ix.meta_path(p), meta)
            datasets[k] = {"prefix": p, "counts": counts, "files": files}
        return {"index": self.index, "records": [self.start.record, end.record], "end": end.to_json(), "datasets": datasets}


# ---------------------------------------------------------------------------------------------- driver


_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MB [{elapsed}<{remaining}{postfix}]"


class _Progress:
    def __init__(self, enabled: bool, total_bytes: Optional[int]):
        self.bar = None
        self.t0 = time.time()
        self.docs = 0
        self.tokens = 0
        self.bytes = 0
        self._last = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=None if total_bytes is None else round(total_bytes / 1e6, 3), unit="MB", desc="preprocess",
                file=sys.stderr, mininterval=1.0, dynamic_ncols=True,
                bar_format=_BAR_FORMAT if total_bytes else "{desc}: {n:.1f} MB [{elapsed}{postfix}]",
            )

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        if self.bar is None:
            return
        self.bar.update(nbytes / 1e6)
        now = time.time()
        if now - self._last >= 1.0:
            self._last = now
            dt = max(now - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{self.docs / dt:,.0f} docs/s, {self.bytes / dt / 1e6:,.1f} MB/s, {self.tokens / dt:,.0f} tok/s",
                refresh=False,
            )

    def close(self, success: bool = False) -> dict:
        if self.bar is not None:
            if success and self.bar.total:
                self.bar.n = self.bar.total
                self.bar.refresh()
            self.bar.close()
        dt = max(time.time() - self.t0, 1e-9)
        return {
            "seconds": round(dt, 3),
            "docs": self.docs,
            "tokens": self.tokens,
            "input_bytes": self.bytes,
            "docs_per_s": round(self.docs / dt, 1),
            "mb_per_s": round(self.bytes / dt / 1e6, 3),
            "tokens_per_s": round(self.tokens / dt, 1),
        }


def _resolve_dtype(name: str, vocab_size: int) -> np.dtype:
    if name == "auto":
        return ix.token_dtype_for_vocab(vocab_size)
    if name not in ("uint16", "int32"):
        raise InputError(f"--dtype {name} is not supported; use auto, uint16 or int32")
    return ix.check_dtype_fits(name, vocab_size)


def _sharding(cfg: PreprocessConfig) -> Tuple[str, float]:
    given = [(n, v) for n, v in (("shards", cfg.shards), ("docs_per_shard", cfg.docs_per_shard), ("shard_size_mb", cfg.shard_size_mb)) if v is not None]
    if len(given) > 1:
        raise InputError("give at most one of --shards, --docs-per-shard, --shard-size-mb")
    mode, value = given[0] if given else ("shards", 1)
    if value <= 0:
        raise InputError(f"--{mode.replace('_', '-')} must be positive (got {value})")
    return mode, value


def _relpath(p: str, start: str) -> str:
    return os.path.relpath(os.path.abspath(p), start)


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the pipeline; returns the manifest (also written to <output_prefix>.manifest.json), with the
    run's throughput under the extra key "run" (not written to disk: the manifest stays deterministic)."""
    tok = load_tokenizer(cfg.tokenizer)
    dtype = _resolve_dtype(cfg.dtype, tok.vocab_size)
    keys = list(cfg.json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise InputError(f"--json-keys must be distinct key names (got {keys})")
    if cfg.append_eod:
        tok.eod  # noqa: B018  (raises a clear error for a tokenizer without eos)
    files = expand_inputs(cfg.inputs)
    jsonl_by_file = [is_jsonl(f) for f in files]
    mode, value = _sharding(cfg)
    workers = cfg.workers if cfg.workers and cfg.workers > 0 else (os.cpu_count() or 1)
    out = cfg.output_prefix
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    manifest_file = out + ix.MANIFEST_SUFFIX

    boundaries = None  # record index at which each shard starts (+ total), for --shards / --docs-per-shard
    total_records = None
    if mode == "shards":
        total_records = sum(count_records(f, cfg.text_mode) for f in files)
        n = int(value)
        if n > max(1, total_records):
            logger.warning("--shards %d is more than the %d input records; using %d shards", n, total_records, max(1, total_records))
            n = max(1, total_records)
        boundaries = [k * total_records // n for k in range(n + 1)]

    tok_info = tok.info()
    settings = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "inputs": input_fingerprint(files),
        "json_keys": keys,
        "text_mode": cfg.text_mode,
        "append_eod": bool(cfg.append_eod),
        "dtype": dtype.name,
        "sharding": {"mode": mode, "value": value},
        "tokenizer": tok_info,
    }
    fingerprint = hashlib.sha256(
        json.dumps({**settings, "tokenizer": tok_info["sha256"]}, sort_keys=True).encode()
    ).hexdigest()
    common_meta = {
        "format": "megatron-tempnet-dataset",
        "version": 1,
        "made_by": "preprocess_data",
        "fingerprint": fingerprint,
        "tokenizer": tok_info,
        "dtype": dtype.name,
        "append_eod": bool(cfg.append_eod),
    }

    def prefixes_of(k: int) -> Dict[str, str]:
        return {key: shard_prefix(out, keys, key, k) for key in keys}

    # ---- resume: keep the leading run of shards whose done markers match their files
    done: List[dict] = []
    k = 0
    while not cfg.force:
        if boundaries is not None and k >= len(boundaries) - 1:
            break
        entry = {"index": k, "datasets": {}}
        ok = True
        for key, p in prefixes_of(k).items():
            meta = ix.read_meta(p)
            if not meta or meta.get("fingerprint") != fingerprint or meta.get("shard") != k:
                ok = False
                break
            if not ix.meta_matches_files(meta, p, verify_checksums=cfg.verify_existing):
                ok = False
                break
            entry["datasets"][key] = {"prefix": p, "counts": meta["counts"], "files": meta["files"]}
            entry["records"] = [meta["records"]["start"]["record"], meta["records"]["end"]["record"]]
            entry["end"] = meta["records"]["end"]
        if not ok:
            break
        if done and entry["records"][0] != done[-1]["records"][1]:
            break
        done.append(entry)
        k += 1
    if done:
        logger.info("resuming after %d complete shard(s) (records 0..%d)", len(done), done[-1]["records"][1])
        print(f"[preprocess] {len(done)} shard(s) already complete; resuming at record {done[-1]['records'][1]}", file=sys.stderr)

    def write_manifest(complete: bool) -> dict:
        prefixes = {key: [_relpath(s["datasets"][key]["prefix"], out_dir) for s in done] for key in keys}
        per_key = {}
        for key in keys:
            sk = collections.Counter()
            docs = toks = 0
            for s in done:
                c = s["datasets"][key]["counts"]
                docs += c["docs"]
                toks += c["tokens"]
                sk.update(c["skipped"])
            per_key[key] = {"docs": docs, "tokens": toks, "skipped": dict(sorted(sk.items()))}
        total_sk = collections.Counter()
        for v in per_key.values():
            total_sk.update(v["skipped"])
        counts = {
            "records": done[-1]["records"][1] if done else 0,
            "docs": sum(v["docs"] for v in per_key.values()),
            "tokens": sum(v["tokens"] for v in per_key.values()),
            "skipped": dict(sorted(total_sk.items())),
        }
        if len(keys) > 1:
            counts["per_key"] = per_key
        man = dict(settings)
        man.update(
            complete=complete,
            fingerprint=fingerprint,
            counts=counts,
            prefixes=prefixes,
            shards=[
                {
                    "index": s["index"],
                    "records": s["records"],
                    "datasets": {
                        key: {
                            "prefix": _relpath(d["prefix"], out_dir),
                            "docs": d["counts"]["docs"],
                            "tokens": d["counts"]["tokens"],
                            "bin_bytes": d["files"]["bin"]["bytes"],
                            "bin_sha256": d["files"]["bin"]["sha256"],
                            "idx_sha256": d["files"]["idx"]["sha256"],
                        }
                        for key, d in s["datasets"].items()
                    },
                }
                for s in done
            ],
        )
        ix.write_json_atomic(manifest_file, man)
        return man

    start = Position.from_json(done[-1]["end"]) if done else Position()
    first_shard = len(done)
    finished_all = boundaries is not None and first_shard >= len(boundaries) - 1
    def remove_shards_from(j: int) -> None:
        """Remove our shards (those with a .meta.json marker) from index j on: leftovers of another run."""
        while True:
            ps = prefixes_of(j)
            if not any(os.path.exists(ix.meta_path(p)) for p in ps.values()):
                return
            for p in ps.values():
                for f in (ix.meta_path(p), p + ".idx", p + ".bin"):  # marker first: never a marker without data
                    if os.path.exists(f):
                        os.remove(f)
            j += 1

    if not done:
        remove_shards_from(0)  # a fresh run: an earlier run's shards must not mix with the new ones

    progress_stats = None
    total_bytes = sum(os.path.getsize(f) for f in files) if not any(f.endswith(".gz") for f in files) else None
    if total_bytes is not None and start.record:
        total_bytes = max(0, total_bytes - sum(os.path.getsize(f) for f in files[: start.file]) - start.offset)
    skips_logged = 0
    success = False
    shard: Optional[_Shard] = None
    pool = None
    prog = None
    try:
        if not finished_all:
            init_args = (tok.path, tok.sha256, keys, jsonl_by_file, dtype.name, cfg.append_eod)
            if workers > 1:
                # spawn: light workers that never import torch / megatron. Started before this process
                # imports megatron-core (in _Shard), so they do not even inherit its memory at fork time.
                ctx = mp.get_context(_start_method())
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
            else:
                _init_worker(*init_args)
            shard = _Shard(first_shard, prefixes_of(first_shard), dtype, start)
        prog = _Progress(cfg.progress and not finished_all, total_bytes)
        if not finished_all:

            def chunks():
                recs, meta, nbytes = [], [], 0
                for rec in iter_records(files, cfg.text_mode, start):
                    recs.append((rec.file, rec.raw))
                    meta.append(rec)
                    nbytes += rec.nbytes
                    if len(recs) >= cfg.chunk_records or nbytes >= cfg.chunk_bytes:
                        yield recs, meta, nbytes
                        recs, meta, nbytes = [], [], 0
                if recs:
                    yield recs, meta, nbytes

            def results():
                if pool is None:
                    for recs, meta, nbytes in chunks():
                        yield _process_chunk(recs), meta, nbytes
                    return
                window = collections.deque()
                limit = workers * max(1, cfg.prefetch)
                for recs, meta, nbytes in chunks():
                    window.append((pool.apply_async(_process_chunk, (recs,)), meta, nbytes))
                    if len(window) >= limit:
                        r, m, n = window.popleft()
                        yield r.get(), m, n
                while window:
                    r, m, n = window.popleft()
                    yield r.get(), m, n

            last_end = start
            for (kept, skips), meta, nbytes in results():
                # merge kept documents and skips back into record order
                events = collections.defaultdict(list)
                for key, (offs, lengths, toks) in kept.items():
                    pos = np.concatenate([[0], np.cumsum(lengths)])
                    for i, off in enumerate(offs.tolist()):
                        events[off].append((key, toks[pos[i] : pos[i + 1]]))
                for off, key, reason, detail in skips:
                    events[off].append((key, SkipRecord(reason, detail)))
                chunk_docs = chunk_tokens = 0
                for off, rec in enumerate(meta):
                    if boundaries is not None:
                        while rec.index >= boundaries[shard.index + 1]:
                            if shard.index + 1 >= len(boundaries) - 1:
                                raise InputError(
                                    f"the inputs have more records than the {boundaries[-1]} counted at the start: "
                                    f"{files[rec.file]} changed during preprocessing; rerun when the inputs are final"
                                )
                            done.append(shard.finish(last_end, common_meta))
                            write_manifest(False)
                            shard = _Shard(shard.index + 1, prefixes_of(shard.index + 1), dtype, last_end)
                    evs = events.get(off, ())
                    # record-level skips come with key None; order keys as given
                    for key, item in sorted(evs, key=lambda e: -1 if e[0] is None else keys.index(e[0])):
                        if isinstance(item, SkipRecord):
                            where = f"{files[rec.file]}:{rec.line}" if rec.line else files[rec.file]
                            if cfg.strict and item.reason in STRICT_REASONS:
                                raise InputError(
                                    f"{where}: {item.reason.replace('_', ' ')}"
                                    f"{' (' + item.detail + ')' if item.detail else ''}"
                                    f"{' for key ' + repr(key) if key else ''}; fix this record, or run without "
                                    f"--strict to skip (and count) such records"
                                )
                            shard.skip(key, item.reason)
                            if item.reason != "blank_line" and skips_logged < cfg.log_skips:
                                skips_logged += 1
                                msg = f"[preprocess] skipped {where}: {item.reason}"
                                if item.detail:
                                    msg += f" ({item.detail})"
                                if key:
                                    msg += f" [key {key!r}]"
                                prog.say(msg)
                        else:
                            shard.add(key, item)
                            chunk_docs += 1
                            chunk_tokens += int(item.size)
                    shard.records += 1
                    last_end = rec.end
                    if mode == "docs_per_shard" and shard.records >= value:
                        done.append(shard.finish(last_end, common_meta))
                        write_manifest(False)
                        shard = _Shard(shard.index + 1, prefixes_of(shard.index + 1), dtype, last_end)
                    elif mode == "shard_size_mb" and shard.bytes >= value * 1e6:
                        done.append(shard.finish(last_end, common_meta))
                        write_manifest(False)
                        shard = _Shard(shard.index + 1, prefixes_of(shard.index + 1), dtype, last_end)
                prog.update(nbytes, chunk_docs, chunk_tokens)

            # close the last shard(s)
            if boundaries is not None:
                while True:
                    done.append(shard.finish(last_end, common_meta))
                    if shard.index + 1 >= len(boundaries) - 1:
                        shard = None
                        break
                    write_manifest(False)
                    shard = _Shard(shard.index + 1, prefixes_of(shard.index + 1), dtype, last_end)
            elif shard.records > 0 or not done:
                done.append(shard.finish(last_end, common_meta))
                shard = None
            else:
                shard.abort()
                shard = None
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
        success = True
    finally:
        progress_stats = prog.close(success) if prog is not None else {}
        if pool is not None:
            pool.terminate()
            pool.join()
        if shard is not None:
            shard.abort()
            if done:
                write_manifest(False)
    remove_shards_from(len(done))
    man = write_manifest(True)
    man["run"] = dict(progress_stats, workers=workers, resumed_shards=first_shard)
    return man
