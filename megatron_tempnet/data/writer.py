"""Writing preprocess_data's shards: Megatron .bin/.idx pairs, streamed, hashed while written, renamed when done.

TokenFileWriter writes one .bin/.idx pair in the layout of megatron-core's IndexedDatasetBuilder (see
indexed.py; one sequence per document), byte for byte, but keeps no per-document Python lists: the
document lengths are streamed to a side file, so memory stays flat however many documents a shard
holds, and both files are hashed as they are written, never read back.

Shard is one shard being written (one TokenFileWriter per JSON key, all to .tmp names); finish() fsyncs,
renames into place (.bin before .idx: an .idx on disk always has its complete .bin beside it) and then
writes the <prefix>.meta.json done marker.
"""
from __future__ import annotations

import collections
import hashlib
import os
import struct
from typing import Dict, Optional

import numpy as np

from megatron_tempnet.data import indexed as ix
from megatron_tempnet.data.inputs import Position

_CHUNK = 1 << 20  # index entries per write when the .idx is assembled


class TokenFileWriter:
    """<prefix>.bin.tmp / <prefix>.idx.tmp for tokens of one dtype; add() documents, then finish()."""

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self.docs = self.tokens = 0
        self._bin = open(prefix + ".bin.tmp", "wb")
        self._lengths = open(prefix + ".lengths.tmp", "w+b")  # int32 per document, read back by finish()
        self._bin_sha = hashlib.sha256()

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: (sum(lengths),) of self.dtype, the documents back to back; lengths: (docs,) tokens each."""
        data = memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)).cast("B")
        self._bin.write(data)
        self._bin_sha.update(data)
        self._lengths.write(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())
        self.docs += int(lengths.size)
        self.tokens += int(tokens.size)

    def _write_idx(self) -> str:
        """Header, lengths (int32), pointers (int64 byte offsets), document indices (int64 0..docs)."""
        h = hashlib.sha256()
        n = self.docs
        with open(self.prefix + ".idx.tmp", "wb") as out:

            def put(b) -> None:
                out.write(b)
                h.update(b)

            code = ix.CODE_OF_DTYPE[self.dtype.name]
            put(ix.INDEX_MAGIC + struct.pack("<Q", ix.INDEX_VERSION) + struct.pack("<B", code) + struct.pack("<QQ", n, n + 1))
            for chunk in self._length_chunks():
                put(chunk.tobytes())
            offset = 0
            for chunk in self._length_chunks():
                ends = np.cumsum(chunk, dtype=np.int64) * self.dtype.itemsize + offset
                put(np.concatenate([[offset], ends[:-1]]).astype(np.int64).tobytes())
                offset = int(ends[-1])
            for start in range(0, n + 1, _CHUNK):
                put(np.arange(start, min(n + 1, start + _CHUNK), dtype=np.int64).tobytes())
            out.flush()
            os.fsync(out.fileno())
        return h.hexdigest()

    def _length_chunks(self):
        self._lengths.seek(0)
        while True:
            b = self._lengths.read(4 * _CHUNK)
            if not b:
                return
            yield np.frombuffer(b, dtype=np.int32)

    def finish(self) -> dict:
        """Complete and fsync both .tmp files (not yet renamed); returns their sizes and sha256."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        bin_bytes = os.path.getsize(self.prefix + ".bin.tmp")
        if bin_bytes != self.tokens * self.dtype.itemsize:
            raise RuntimeError(f"internal error: {self.prefix}.bin.tmp has {bin_bytes} bytes for {self.tokens} tokens")
        idx_sha = self._write_idx()
        self._close_lengths()
        return {
            "bin": {"bytes": bin_bytes, "sha256": self._bin_sha.hexdigest()},
            "idx": {"bytes": os.path.getsize(self.prefix + ".idx.tmp"), "sha256": idx_sha},
        }

    def _close_lengths(self) -> None:
        self._lengths.close()
        if os.path.exists(self.prefix + ".lengths.tmp"):
            os.remove(self.prefix + ".lengths.tmp")

    def abort(self) -> None:
        for f in (self._bin, self._lengths):
            try:
                f.close()
            except OSError:
                pass
        remove_temporaries(self.prefix)


def remove_temporaries(prefix: str) -> None:
    for t in (prefix + ".bin.tmp", prefix + ".idx.tmp", prefix + ".lengths.tmp"):
        if os.path.exists(t):
            os.remove(t)


class Shard:
    """One shard being written: one TokenFileWriter per key, counts, the record range it covers."""

    def __init__(self, index: int, prefixes: Dict[str, str], dtype: np.dtype, start: Position):
        self.index = index
        self.prefixes = prefixes
        self.start = start
        self.records = 0
        self.bytes = 0
        self.counts = {k: {"skipped": collections.Counter()} for k in prefixes}
        self.writers: Dict[str, TokenFileWriter] = {}
        for k, p in prefixes.items():
            if os.path.exists(ix.meta_path(p)):
                os.remove(ix.meta_path(p))
            remove_temporaries(p)
            self.writers[k] = TokenFileWriter(p, dtype)

    def add(self, key: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.writers[key].add(tokens, lengths)
        self.bytes += tokens.size * self.writers[key].dtype.itemsize

    def skip(self, key: Optional[str], reason: str) -> None:
        for k in self.counts if key is None else (key,):
            self.counts[k]["skipped"][reason] += 1

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()

    def finish(self, end: Position, common_meta: dict) -> dict:
        """Finalize, fsync, rename into place, write the .meta.json done marker. Returns the shard record."""
        datasets = {}
        for k, p in self.prefixes.items():
            w = self.writers[k]
            files = w.finish()
            os.replace(p + ".bin.tmp", p + ".bin")
            os.replace(p + ".idx.tmp", p + ".idx")
            counts = {"docs": w.docs, "tokens": w.tokens, "skipped": dict(sorted(self.counts[k]["skipped"].items()))}
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
