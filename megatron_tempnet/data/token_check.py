"""What the trainer checks in the data it reads, beyond file sizes (indexed.check_dataset_prefix):

- the .idx pointers are the running sum of the sequence lengths (each sequence starts where the previous
  one ended), so no sequence reads another's tokens or past the end of the .bin;
- every token id lies in the model's vocabulary. Data without a tokenizer record (a .bin/.idx written by
  Megatron-LM, without our .meta.json sidecar) would otherwise train silently on ids beyond the embedding
  table at TP > 1 (each rank's shard masks them out) and fail with a bare IndexError at TP = 1.

Both need one pass over the files (the .bin is read at disk speed once); the result (smallest and largest
id, first bad pointer) is cached in a small JSON file beside the .idx, or under the index-cache folder
when the data folder is read-only, keyed by the sizes and modification times of the .bin and .idx.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from ..files import atomic_write_text
from .indexed import HEADER_BYTES, DatasetError, bin_path, check_dataset_prefix, idx_path, normalize_prefix

STATS_SUFFIX = ".token_stats.json"
STATS_VERSION = 1
_CHUNK_TOKENS = 1 << 24  # 16 Mi tokens per read: bounded memory on any dataset


def _file_key(prefix: str) -> dict:
    key = {}
    for name, path in (("bin", bin_path(prefix)), ("idx", idx_path(prefix))):
        st = os.stat(path)
        key[name] = [st.st_size, st.st_mtime_ns]
    return key


def _cache_files(prefix: str, cache_dir: Optional[str]) -> list:
    beside = prefix + STATS_SUFFIX
    if not cache_dir:
        return [beside]
    name = hashlib.sha1(os.path.abspath(prefix).encode()).hexdigest()[:16] + STATS_SUFFIX
    return [beside, os.path.join(cache_dir, name)]


def _compute(prefix: str, info: dict) -> dict:
    s = info["sequence_count"]
    dtype = np.dtype(info["dtype"])
    ip = idx_path(prefix)
    bad_pointer = None
    if s:
        lengths = np.memmap(ip, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(s,))
        pointers = np.memmap(ip, dtype=np.int64, mode="r", offset=HEADER_BYTES + 4 * s, shape=(s,))
        expected = np.zeros(s, dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
        expected *= dtype.itemsize
        wrong = np.flatnonzero((pointers != expected) | (lengths < 0))
        bad_pointer = int(wrong[0]) if wrong.size else None
        del lengths, pointers
    low, high = None, None
    n = info["tokens"]
    if n:
        tokens = np.memmap(bin_path(prefix), dtype=dtype, mode="r", shape=(n,))
        for start in range(0, n, _CHUNK_TOKENS):
            chunk = tokens[start:start + _CHUNK_TOKENS]
            lo, hi = int(chunk.min()), int(chunk.max())
            low, high = lo if low is None else min(low, lo), hi if high is None else max(high, hi)
        del tokens
    return {"version": STATS_VERSION, "min_id": low, "max_id": high, "first_bad_pointer": bad_pointer}


def token_stats(prefix: str, cache_dir: Optional[str] = None) -> dict:
    """{"min_id", "max_id", "first_bad_pointer"} of a dataset (None where it has no tokens / no bad pointer),
    from the cache when the files have not changed since it was written, else computed and cached."""
    prefix = normalize_prefix(prefix)
    info = check_dataset_prefix(prefix)
    key = _file_key(prefix)
    candidates = _cache_files(prefix, cache_dir)
    for path in candidates:
        try:
            with open(path) as f:
                cached = json.load(f)
            if cached.get("version") == STATS_VERSION and cached.get("files") == key:
                return cached
        except (OSError, ValueError):
            continue
    stats = {**_compute(prefix, info), "files": key}
    for path in candidates:  # the first place that takes it
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            atomic_write_text(path, json.dumps(stats))
            break
        except OSError:
            pass
    return stats


def check_token_content(prefix: str, vocab_size: int, cache_dir: Optional[str] = None) -> dict:
    """Refuse a dataset whose pointers disagree with its lengths or whose ids fall outside [0, vocab_size).
    Returns its token stats."""
    prefix = normalize_prefix(prefix)
    stats = token_stats(prefix, cache_dir)
    if stats["first_bad_pointer"] is not None:
        raise DatasetError(
            f"{idx_path(prefix)} is corrupt: the pointer of sequence {stats['first_bad_pointer']} is not the sum of "
            f"the lengths before it, so sequences would read each other's tokens; rebuild it with "
            f"tools/preprocess_data.py")
    if stats["max_id"] is not None and (stats["max_id"] >= vocab_size or stats["min_id"] < 0):
        bad = stats["max_id"] if stats["max_id"] >= vocab_size else stats["min_id"]
        raise DatasetError(
            f"{bin_path(prefix)} holds token id {bad}, outside the model's vocabulary of {vocab_size} ids "
            f"(0..{vocab_size - 1}): the data was made with another tokenizer. Pass the tokenizer it was made with "
            f"(--tokenizer-model), or re-run tools/preprocess_data.py with this one")
    return stats
