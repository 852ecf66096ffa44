"""Tokenize a corpus into sharded Megatron indexed datasets (.bin/.idx), streaming, at the tokenizer's speed.

This is the library behind tools/preprocess_data.py; see that file for the command line.

Pipeline: one process, three overlapping stages. The main thread reads the input in blocks of about
`chunk_bytes` (whole lines; inputs.iter_batches) and parses them (inputs.parse_batch: one decode and one
json.loads per well-formed record); a second thread hands each batch's texts to the tokenizer backend
(encoders.py), whose own threads (--workers of them) encode it while the main thread parses the next
batch and writes the previous one. Nothing is pickled between processes, token ids stay numpy arrays
from the tokenizer to the file, and the files are hashed while written (writer.py). At most three
batches are alive at a time, so memory is bounded whatever the corpus size.

Determinism. Which shard a document lands in depends only on its running record index in the input
(--shards N: N contiguous ranges of records, counted in a quick pre-pass; --docs-per-shard K: every K
records; --shard-size-mb M: a shard closes once its .bin files reach M MB), never on the number of
workers, the batch size or timing; and every backend gives the reference library's ids (checked on the
first documents of every run). So the output is byte-identical for any --workers and any backend, and
the shards concatenated in order (tools/merge_datasets.py) equal the single-shard output.

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
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_tempnet.data import indexed as ix
from megatron_tempnet.data.encoders import Encoder, ParityCheck, describe, encode_checked, make_encoder, reference_encoder
from megatron_tempnet.data.inputs import (
    STRICT_REASONS,
    InputError,
    Position,
    RecordBatch,
    count_records,
    expand_inputs,
    input_fingerprint,
    is_jsonl,
    iter_batches,
    parse_batch,
)
from megatron_tempnet.data.progress import Progress
from megatron_tempnet.data.tokenizer import load_tokenizer
from megatron_tempnet.data.writer import Shard

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
    workers: int = 0  # tokenizer threads; 0: os.cpu_count()
    tokenizer_backend: str = "auto"  # auto | sentencepiece | hf | gigatoken (encoders.py)
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
    chunk_records: int = 1 << 20  # a batch holds at most this many records ...
    chunk_bytes: int = 2 << 20  # ... and about this many input bytes
    parity_docs: int = 64  # documents compared with the reference library at the start of a run ...
    parity_bytes: int = 256 << 10  # ... and at most about this many characters of them


def shard_prefix(output_prefix: str, keys: Sequence[str], key: str, shard: int) -> str:
    if len(keys) > 1:
        return f"{output_prefix}_{key}_{shard:05d}"
    return f"{output_prefix}_{shard:05d}"


# ---------------------------------------------------------------------------------------------- progress


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class _Plan:
    """Everything a run decides before it reads the first record."""

    cfg: PreprocessConfig
    keys: List[str]
    files: List[str]
    jsonl_by_file: List[bool]
    dtype: np.dtype
    eod: Optional[int]
    encoder: Encoder
    reference: Encoder
    threads: int
    mode: str
    value: float
    boundaries: Optional[List[int]]  # record index at which each shard starts (+ total), for --shards
    settings: dict
    fingerprint: str
    common_meta: dict
    out_dir: str

    def prefixes(self, k: int) -> Dict[str, str]:
        return {key: shard_prefix(self.cfg.output_prefix, self.keys, key, k) for key in self.keys}


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


def _shard_boundaries(files: Sequence[str], text_mode: str, n: int) -> List[int]:
    total = sum(count_records(f, text_mode) for f in files)
    if n > max(1, total):
        logger.warning("--shards %d is more than the %d input records; using %d shards", n, total, max(1, total))
        n = max(1, total)
    return [k * total // n for k in range(n + 1)]


def _plan(cfg: PreprocessConfig, say: Callable[[str], None]) -> _Plan:
    """Check every option and input before any work (clear errors first), and fix the run's settings."""
    tok = load_tokenizer(cfg.tokenizer)
    dtype = _resolve_dtype(cfg.dtype, tok.vocab_size)
    keys = list(cfg.json_keys)
    if not keys or len(set(keys)) != len(keys):
        raise InputError(f"--json-keys must be distinct key names (got {keys})")
    eod = tok.eod if cfg.append_eod else None  # raises a clear error for a tokenizer without eos
    files = expand_inputs(cfg.inputs)
    mode, value = _sharding(cfg)
    threads = cfg.workers if cfg.workers and cfg.workers > 0 else (os.cpu_count() or 1)
    encoder = make_encoder(tok, cfg.tokenizer_backend, threads, say)
    reference = encoder if encoder.name == ("sentencepiece" if tok.kind == "sentencepiece" else "hf") else reference_encoder(tok, threads)
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
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
    # the backend is not part of the fingerprint: every backend writes the same bytes
    fingerprint = hashlib.sha256(json.dumps({**settings, "tokenizer": tok_info["sha256"]}, sort_keys=True).encode()).hexdigest()
    common_meta = {
        "format": "megatron-tempnet-dataset",
        "version": 1,
        "made_by": "preprocess_data",
        "fingerprint": fingerprint,
        "tokenizer": tok_info,
        "dtype": dtype.name,
        "append_eod": bool(cfg.append_eod),
    }
    return _Plan(
        cfg=cfg, keys=keys, files=files, jsonl_by_file=[is_jsonl(f) for f in files], dtype=dtype, eod=eod,
        encoder=encoder, reference=reference, threads=threads, mode=mode, value=value,
        boundaries=_shard_boundaries(files, cfg.text_mode, int(value)) if mode == "shards" else None,
        settings=settings, fingerprint=fingerprint, common_meta=common_meta, out_dir=out_dir,
    )


# ---------------------------------------------------------------------------------------------- resume and manifest


def _completed_shards(plan: _Plan) -> List[dict]:
    """The leading run of shards whose done markers match this run's settings and their files."""
    done: List[dict] = []
    k = 0
    while not plan.cfg.force:
        if plan.boundaries is not None and k >= len(plan.boundaries) - 1:
            break
        entry: dict = {"index": k, "datasets": {}}
        for key, p in plan.prefixes(k).items():
            meta = ix.read_meta(p)
            if not meta or meta.get("fingerprint") != plan.fingerprint or meta.get("shard") != k:
                return done
            if not ix.meta_matches_files(meta, p, verify_checksums=plan.cfg.verify_existing):
                return done
            entry["datasets"][key] = {"prefix": p, "counts": meta["counts"], "files": meta["files"]}
            entry["records"] = [meta["records"]["start"]["record"], meta["records"]["end"]["record"]]
            entry["end"] = meta["records"]["end"]
        if done and entry["records"][0] != done[-1]["records"][1]:
            return done
        done.append(entry)
        k += 1
    return done


def _relpath(p: str, start: str) -> str:
    return os.path.relpath(os.path.abspath(p), start)


def _counts(keys: Sequence[str], done: List[dict]) -> dict:
    per_key = {}
    for key in keys:
        sk: collections.Counter = collections.Counter()
        docs = toks = 0
        for s in done:
            c = s["datasets"][key]["counts"]
            docs += c["docs"]
            toks += c["tokens"]
            sk.update(c["skipped"])
        per_key[key] = {"docs": docs, "tokens": toks, "skipped": dict(sorted(sk.items()))}
    total_sk: collections.Counter = collections.Counter()
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
    return counts


def _write_manifest(plan: _Plan, done: List[dict], complete: bool) -> dict:
    out_dir = plan.out_dir
    man = dict(plan.settings)
    man.update(
        encoding=describe(plan.encoder, plan.reference),
        complete=complete,
        fingerprint=plan.fingerprint,
        counts=_counts(plan.keys, done),
        prefixes={key: [_relpath(s["datasets"][key]["prefix"], out_dir) for s in done] for key in plan.keys},
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
    ix.write_json_atomic(plan.cfg.output_prefix + ix.MANIFEST_SUFFIX, man)
    return man


def _remove_shards_from(plan: _Plan, j: int) -> None:
    """Remove our shards (those with a .meta.json marker) from index j on: leftovers of another run."""
    while True:
        ps = plan.prefixes(j)
        if not any(os.path.exists(ix.meta_path(p)) for p in ps.values()):
            return
        for p in ps.values():
            for f in (ix.meta_path(p), p + ".idx", p + ".bin"):  # marker first: never a marker without data
                if os.path.exists(f):
                    os.remove(f)
        j += 1


# ---------------------------------------------------------------------------------------------- encoding


_Encoded = Dict[str, Tuple[np.ndarray, np.ndarray]]  # key -> (tokens in the output dtype, lengths int64)


def _encode_batch(plan: _Plan, parity: ParityCheck, batch: RecordBatch, texts: dict, recs: dict, say) -> _Encoded:
    """Tokenize one batch's texts (runs on the encoding thread), check parity, append EOD, cast."""
    out = {}
    limit = np.iinfo(plan.dtype).max
    for key in plan.keys:
        tokens, lengths = encode_checked(plan.encoder, plan.reference, texts[key], say) if texts[key] else (
            np.zeros(0, np.int64), np.zeros(0, np.int64))
        parity.check(texts[key], tokens, lengths, lambda i: batch.where(plan.files, int(recs[key][i])))
        if tokens.size and (int(tokens.max()) > limit or int(tokens.min()) < 0):
            raise InputError(f"token id {int(tokens.max())} does not fit the output dtype {plan.dtype.name}; use --dtype int32")
        if plan.eod is not None and lengths.size:
            tokens = np.insert(tokens, np.cumsum(lengths), plan.eod)
            lengths = lengths + 1
        out[key] = (tokens.astype(plan.dtype, copy=False), lengths)
    return out


def _encoded_batches(plan: _Plan, parity: ParityCheck, start: Position, say) -> Iterator[Tuple[RecordBatch, dict, list, _Encoded]]:
    """(batch, record offsets per key, skips, encoded) in input order. While the consumer writes batch i,
    batch i+1 is being encoded; batch i+2 is read, parsed and queued before that encode ends, so the
    tokenizer's threads never wait for the main thread."""
    cfg = plan.cfg
    pending = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        for batch in iter_batches(plan.files, cfg.text_mode, start, cfg.chunk_bytes, cfg.chunk_records):
            texts, recs, skips = parse_batch(batch, plan.keys, plan.jsonl_by_file)
            fut = pool.submit(_encode_batch, plan, parity, batch, texts, recs, say)
            if pending is not None:
                yield pending[0], pending[1], pending[2], pending[3].result()
            pending = (batch, recs, skips, fut)
        if pending is not None:
            yield pending[0], pending[1], pending[2], pending[3].result()


# ---------------------------------------------------------------------------------------------- writing


class _ShardSequence:
    """Writes encoded batches into consecutive shards, closing each where the sharding rule says."""

    def __init__(self, plan: _Plan, done: List[dict], start: Position, prog: Progress):
        self.plan, self.done, self.prog = plan, done, prog
        self.shard = Shard(len(done), plan.prefixes(len(done)), plan.dtype, start)
        self.last_end = start
        self.skips_logged = 0

    def _roll(self) -> None:
        self.done.append(self.shard.finish(self.last_end, self.plan.common_meta))
        _write_manifest(self.plan, self.done, False)
        self.shard = Shard(self.shard.index + 1, self.plan.prefixes(self.shard.index + 1), self.plan.dtype, self.last_end)

    def _close_at_boundary(self, batch: RecordBatch, pos: int) -> None:
        b = self.plan.boundaries
        while b is not None and batch.first + pos >= b[self.shard.index + 1]:
            if self.shard.index + 1 >= len(b) - 1:
                raise InputError(
                    f"the inputs have more records than the {b[-1]} counted at the start: "
                    f"{batch.where(self.plan.files, pos)} is past the end; an input changed during preprocessing; "
                    f"rerun when the inputs are final"
                )
            self._roll()

    def _segment_end(self, batch: RecordBatch, pos: int, record_bytes: Optional[np.ndarray]) -> int:
        """The record offset (exclusive) at which the current shard must close, or len(batch)."""
        plan, n = self.plan, len(batch)
        if plan.mode == "shards":
            return min(n, plan.boundaries[self.shard.index + 1] - batch.first)
        if plan.mode == "docs_per_shard":
            return min(n, pos + int(plan.value) - self.shard.records)
        reached = np.nonzero(self.shard.bytes + np.cumsum(record_bytes[pos:]) >= plan.value * 1e6)[0]
        return pos + int(reached[0]) + 1 if reached.size else n

    def _skip(self, batch: RecordBatch, j: int, key: Optional[str], reason: str, detail: str) -> None:
        where = batch.where(self.plan.files, j)
        if self.plan.cfg.strict and reason in STRICT_REASONS:
            raise InputError(
                f"{where}: {reason.replace('_', ' ')}{' (' + detail + ')' if detail else ''}"
                f"{' for key ' + repr(key) if key else ''}; fix this record, or run without "
                f"--strict to skip (and count) such records"
            )
        self.shard.skip(key, reason)
        if reason != "blank_line" and self.skips_logged < self.plan.cfg.log_skips:
            self.skips_logged += 1
            self.prog.say(f"[preprocess] skipped {where}: {reason}{' (' + detail + ')' if detail else ''}"
                          f"{' [key ' + repr(key) + ']' if key else ''}")

    def feed(self, batch: RecordBatch, recs: dict, skips: list, encoded: _Encoded) -> None:
        """Write one batch: its documents, skips and shard closings, in record order."""
        plan, n = self.plan, len(batch)
        starts = {k: np.concatenate([[0], np.cumsum(encoded[k][1])]) for k in plan.keys}
        record_bytes = None
        if plan.mode == "shard_size_mb":
            record_bytes = sum(np.bincount(recs[k], weights=encoded[k][1], minlength=n) for k in plan.keys) * plan.dtype.itemsize
        skip_at = np.asarray([s[0] for s in skips], dtype=np.int64)
        pos = docs = tokens = 0
        while pos < n:
            self._close_at_boundary(batch, pos)
            end = self._segment_end(batch, pos, record_bytes)
            for s in skips[np.searchsorted(skip_at, pos) : np.searchsorted(skip_at, end)]:
                self._skip(batch, *s)  # record order; a --strict error stops before anything after it is written
            for k in plan.keys:
                d0, d1 = np.searchsorted(recs[k], [pos, end])
                if d1 > d0:
                    self.shard.add(k, encoded[k][0][starts[k][d0] : starts[k][d1]], encoded[k][1][d0:d1])
                    docs += int(d1 - d0)
                    tokens += int(starts[k][d1] - starts[k][d0])
            self.shard.records += end - pos
            self.last_end = batch.end(end - 1)
            pos = end
            if (plan.mode == "docs_per_shard" and self.shard.records >= plan.value) or (
                plan.mode == "shard_size_mb" and self.shard.bytes >= plan.value * 1e6
            ):
                self._roll()
        self.prog.update(batch.nbytes, docs, tokens)

    def close(self) -> None:
        """Finish the last shard(s): with --shards N, every shard exists even if its range is empty."""
        b = self.plan.boundaries
        if b is not None:
            while self.shard.index + 1 < len(b) - 1:
                self._roll()
            self.done.append(self.shard.finish(self.last_end, self.plan.common_meta))
        elif self.shard.records > 0 or not self.done:
            self.done.append(self.shard.finish(self.last_end, self.plan.common_meta))
        else:
            self.shard.abort()
        self.shard = None


# ---------------------------------------------------------------------------------------------- driver


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the pipeline; returns the manifest (also written to <output_prefix>.manifest.json), with the
    run's throughput under the extra key "run" (not written to disk: the manifest stays deterministic)."""
    t0 = time.time()
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  (until the progress bar exists)
    plan = _plan(cfg, say)
    done = _completed_shards(plan)
    if done:
        logger.info("resuming after %d complete shard(s) (records 0..%d)", len(done), done[-1]["records"][1])
        say(f"[preprocess] {len(done)} shard(s) already complete; resuming at record {done[-1]['records'][1]}")
    else:
        _remove_shards_from(plan, 0)  # a fresh run: an earlier run's shards must not mix with the new ones
    start = Position.from_json(done[-1]["end"]) if done else Position()
    first_shard = len(done)
    finished_all = plan.boundaries is not None and first_shard >= len(plan.boundaries) - 1
    files = plan.files
    total_bytes = None if any(f.endswith(".gz") for f in files) else sum(os.path.getsize(f) for f in files)
    if total_bytes is not None and start.record:
        total_bytes = max(0, total_bytes - sum(os.path.getsize(f) for f in files[: start.file]) - start.offset)
    parity = ParityCheck(plan.encoder, plan.reference, docs=cfg.parity_docs, max_bytes=cfg.parity_bytes)
    prog = Progress(cfg.progress and not finished_all, total_bytes, t0)
    writer: Optional[_ShardSequence] = None
    success = False
    try:
        if not finished_all:
            writer = _ShardSequence(plan, done, start, prog)
            for batch, recs, skips, encoded in _encoded_batches(plan, parity, start, prog.say):
                writer.feed(batch, recs, skips, encoded)
            writer.close()
        success = True
    finally:
        stats = prog.close(success)
        if writer is not None and writer.shard is not None:
            writer.shard.abort()
            if done:
                _write_manifest(plan, done, False)
    _remove_shards_from(plan, len(done))
    man = _write_manifest(plan, done, True)
    man["run"] = dict(stats, workers=plan.threads, resumed_shards=first_shard, tokenizer_backend=plan.encoder.name,
                      parity_checked_docs=parity.checked)
    return man
