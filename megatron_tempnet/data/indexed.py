"""Megatron's indexed dataset format (.bin + .idx): checks, metadata sidecars, merging.

Writing and reading go through megatron.core.datasets.indexed_dataset (IndexedDatasetBuilder,
IndexedDataset), so the files are interchangeable with Megatron-LM. The .idx layout, all little-endian:

    b"MMIDIDX\\x00\\x00"          9-byte magic
    <Q  version (1)
    <B  dtype code of the tokens in .bin (megatron DType: 4 = int32, 8 = uint16, ...)
    <Q  sequence count S
    <Q  document count D (= number of documents + 1: the document indices start with 0)
    S x int32   sequence lengths (tokens)
    S x int64   sequence pointers (byte offsets into .bin)
    D x int64   document indices (sequence index at which each document ends; first entry 0)

The .bin is the tokens of all sequences back to back, so its size is sum(lengths) * itemsize.

Beside each prefix written by our tools lies `<prefix>.meta.json`: the tokenizer (path, sha256, vocab
size), counts, and the sha256 and size of the .bin and .idx. preprocess_data writes it last, after the
.bin and .idx are complete and renamed into place, so it doubles as the shard's "done" marker.
"""
from __future__ import annotations

import gc
import json
import os
import re
import struct
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..files import atomic_write_text, sha256_file

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # 34
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v).name: k for k, v in DTYPE_CODES.items()}
META_SUFFIX = ".meta.json"
MANIFEST_SUFFIX = ".manifest.json"


class DatasetError(ValueError):
    """A dataset on disk that cannot be used. The message names the problem and the fix."""


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def meta_path(prefix: str) -> str:
    return prefix + META_SUFFIX


def normalize_prefix(path: str) -> str:
    """Accept 'data/x', 'data/x.bin' or 'data/x.idx' and return the prefix 'data/x'."""
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536, ids 0..65535), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def check_dtype_fits(dtype, vocab_size: int) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.name not in CODE_OF_DTYPE:
        raise DatasetError(f"dtype {dt.name} is not a Megatron token dtype; use uint16 or int32")
    max_id = vocab_size - 1
    if max_id > np.iinfo(dt).max:
        raise DatasetError(
            f"the tokenizer's vocabulary has {vocab_size} ids (largest id {max_id}), which does not fit "
            f"{dt.name} (largest value {np.iinfo(dt).max}); use --dtype int32 (or --dtype auto, which picks "
            f"uint16 only for vocabularies of at most 65536 ids)"
        )
    return dt


def read_index_header(prefix: str) -> dict:
    """Parse and check the .idx header and sizes (cheap: reads 34 bytes + a few entries)."""
    ip = idx_path(prefix)
    size = os.path.getsize(ip)
    with open(ip, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != INDEX_MAGIC:
        raise DatasetError(
            f"{ip} is not a Megatron index file (magic {head[:9]!r}, expected {INDEX_MAGIC!r}); "
            f"it may be truncated or another format: rebuild it with tools/preprocess_data.py"
        )
    (version,) = struct.unpack("<Q", head[9:17])
    if version != INDEX_VERSION:
        raise DatasetError(
            f"{ip} has index version {version}; this reader (megatron-core) supports version "
            f"{INDEX_VERSION} only: rebuild it with tools/preprocess_data.py"
        )
    code = head[17]
    if code not in DTYPE_CODES:
        raise DatasetError(f"{ip} has an unknown dtype code {code}; rebuild it with tools/preprocess_data.py")
    seq_count, doc_count = struct.unpack("<QQ", head[18:34])
    dtype = np.dtype(DTYPE_CODES[code])
    expected = HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
    if size not in (expected, expected + seq_count):  # + seq_count: multimodal "modes" bytes
        raise DatasetError(
            f"{ip} is {size} bytes but its header ({seq_count} sequences, {doc_count} document entries) "
            f"implies {expected}: the index is truncated or corrupt; rebuild it with tools/preprocess_data.py"
        )
    return {
        "version": version,
        "dtype": dtype.name,
        "dtype_code": code,
        "sequence_count": seq_count,
        "document_count": doc_count,
        "idx_bytes": size,
    }


def check_dataset_prefix(prefix: str) -> dict:
    """Check that `prefix` names a complete, readable Megatron dataset; return its summary.

    Clear errors (DatasetError) for: a missing .idx, an .idx without its .bin, a bad magic or version,
    a truncated .idx, and a .bin whose size differs from what the .idx implies (truncated copy or write).
    Reads only the header and the last entries, so it is cheap on large datasets.
    """
    prefix = normalize_prefix(prefix)
    ip, bp = idx_path(prefix), bin_path(prefix)
    if not os.path.isfile(ip):
        hint = ""
        if os.path.isfile(bp):
            hint = f" ({bp} exists without its index: the write did not finish or the .idx was not copied)"
        elif os.path.isfile(prefix + MANIFEST_SUFFIX) or os.path.isfile(prefix + "_00000.idx"):
            hint = f" (this looks like a sharded output: use its shard prefixes, e.g. {prefix}_00000, or the manifest {prefix}{MANIFEST_SUFFIX})"
        raise DatasetError(
            f"no dataset at prefix {prefix}: {ip} does not exist{hint}. Pass the prefix without .bin/.idx "
            f"and make it with tools/preprocess_data.py"
        )
    if not os.path.isfile(bp):
        raise DatasetError(
            f"{ip} exists but its data file {bp} is missing: copy the .bin together with the .idx, or "
            f"rebuild the dataset with tools/preprocess_data.py"
        )
    info = read_index_header(prefix)
    s, d = info["sequence_count"], info["document_count"]
    itemsize = np.dtype(info["dtype"]).itemsize
    lengths = np.memmap(ip, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(s,)) if s else np.zeros(0, np.int32)
    pointers = (
        np.memmap(ip, dtype=np.int64, mode="r", offset=HEADER_BYTES + 4 * s, shape=(s,)) if s else np.zeros(0, np.int64)
    )
    docs = np.memmap(ip, dtype=np.int64, mode="r", offset=HEADER_BYTES + 12 * s, shape=(d,)) if d else np.zeros(0, np.int64)
    if d == 0 or int(docs[0]) != 0 or int(docs[-1]) != s:
        raise DatasetError(
            f"{ip} has inconsistent document indices (first {int(docs[0]) if d else None}, last "
            f"{int(docs[-1]) if d else None}, {s} sequences): the index is corrupt; rebuild it"
        )
    expected_bin = int(pointers[-1]) + int(lengths[-1]) * itemsize if s else 0
    actual_bin = os.path.getsize(bp)
    if actual_bin != expected_bin:
        what = "truncated" if actual_bin < expected_bin else "longer than its index says"
        raise DatasetError(
            f"{bp} is {actual_bin} bytes but {ip} implies {expected_bin} bytes "
            f"({expected_bin // itemsize} {info['dtype']} tokens): the .bin is {what} (an interrupted write or "
            f"copy, or a .bin/.idx pair from different runs); copy it again or rebuild it with tools/preprocess_data.py"
        )
    info.update(
        prefix=prefix,
        documents=d - 1,
        sequences=s,
        tokens=expected_bin // itemsize,
        bin_bytes=actual_bin,
    )
    del lengths, pointers, docs
    return info


# ---------------------------------------------------------------------------------------------- metadata


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path: str, obj: dict) -> None:
    """Write JSON (indent 2, a final newline) atomically: readers see the old or the new file, never half of one."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_meta(prefix: str) -> Optional[dict]:
    p = meta_path(normalize_prefix(prefix))
    if not os.path.isfile(p):
        return None
    try:
        return read_json(p)
    except (OSError, ValueError):
        return None


def meta_matches_files(meta: dict, prefix: str, verify_checksums: bool = True) -> bool:
    """True when the .bin/.idx on disk are exactly the ones the metadata recorded."""
    try:
        for ext, key in ((".bin", "bin"), (".idx", "idx")):
            p = prefix + ext
            if not os.path.isfile(p) or os.path.getsize(p) != meta["files"][key]["bytes"]:
                return False
            if verify_checksums and sha256_file(p) != meta["files"][key]["sha256"]:
                return False
    except (KeyError, TypeError):
        return False
    return True


_SHARD_RE = re.compile(r"^(?P<base>.*)_(?P<shard>\d{5})$")


def find_manifest(prefix_or_manifest: str) -> Optional[str]:
    """The manifest of a preprocess_data output, given the manifest itself, the output prefix or a shard prefix."""
    p = prefix_or_manifest
    if p.endswith(".json") and os.path.isfile(p):
        return p
    p = normalize_prefix(p)
    cands = [p + MANIFEST_SUFFIX]
    m = _SHARD_RE.match(p)
    if m:
        base = m.group("base")
        cands.append(base + MANIFEST_SUFFIX)
        # multi-key outputs: <base>_<key>_<shard>; the manifest is <output_prefix>.manifest.json
        parts = base.rsplit("_", 1)
        if len(parts) == 2:
            cands.append(parts[0] + MANIFEST_SUFFIX)
    for c in cands:
        if os.path.isfile(c):
            return c
    return None


def expand_data_prefixes(paths: Sequence[str], key: Optional[str] = None) -> List[str]:
    """Turn manifests (<out>.manifest.json) into their shard prefixes; other entries pass through."""
    out: List[str] = []
    for p in paths:
        if p.endswith(MANIFEST_SUFFIX) or (p.endswith(".json") and os.path.isfile(p)):
            man = read_json(p)
            prefixes = man.get("prefixes")
            if not isinstance(prefixes, dict):
                raise DatasetError(f"{p} is not a preprocess_data manifest (no 'prefixes')")
            if key is None:
                if len(prefixes) != 1:
                    raise DatasetError(f"{p} holds datasets for keys {sorted(prefixes)}; say which key to use")
                key = next(iter(prefixes))
            if key not in prefixes:
                raise DatasetError(f"{p} has no dataset for key {key!r} (keys: {sorted(prefixes)})")
            base = os.path.dirname(os.path.abspath(p))
            out.extend(pp if os.path.isabs(pp) else os.path.join(base, pp) for pp in prefixes[key])
        else:
            out.append(normalize_prefix(p))
    return out


def tokenizer_info_for(prefix_or_manifest: str) -> Optional[dict]:
    """The tokenizer a dataset was made with, from its manifest or .meta.json (None if unrecorded)."""
    p = prefix_or_manifest
    if p.endswith(".json") and os.path.isfile(p):
        return read_json(p).get("tokenizer")
    meta = read_meta(p)
    if meta and meta.get("tokenizer"):
        return meta["tokenizer"]
    man = find_manifest(p)
    if man:
        return read_json(man).get("tokenizer")
    return None


def check_tokenizer_matches(
    manifest_or_prefix: str,
    model_vocab_size: int,
    *,
    tokenizer=None,
    make_vocab_size_divisible_by: int = 1,
) -> dict:
    """Refuse to train a model on data tokenized with a different vocabulary.

    `model_vocab_size` is the model's vocabulary: either the tokenizer's true size, or that size padded
    up to a multiple of `make_vocab_size_divisible_by` (Megatron's padding). When `tokenizer` (the one the
    training run loads) is given, its content hash must also equal the one the data was made with.
    Returns the recorded tokenizer info. Raises DatasetError naming both sizes and the fix.
    """
    info = tokenizer_info_for(manifest_or_prefix)
    if info is None:
        raise DatasetError(
            f"no tokenizer record for {manifest_or_prefix}: neither a manifest nor a {META_SUFFIX} sidecar was "
            f"found, so the data's vocabulary cannot be checked against the model's ({model_vocab_size}). "
            f"Make the data with tools/preprocess_data.py (which records it), or skip this check knowingly"
        )
    data_vocab = int(info["vocab_size"])
    m = max(1, int(make_vocab_size_divisible_by))
    padded = -(-data_vocab // m) * m
    if model_vocab_size not in (data_vocab, padded):
        pad_note = f" (or {padded}, padded to a multiple of {m})" if padded != data_vocab else ""
        direction = (
            "token ids beyond the model's embedding table would crash or corrupt training"
            if data_vocab > model_vocab_size
            else "the model would train on a vocabulary its data does not use"
        )
        raise DatasetError(
            f"tokenizer/model vocabulary mismatch: {manifest_or_prefix} was tokenized with a vocabulary of "
            f"{data_vocab} ids ({info.get('path')}, sha256 {str(info.get('sha256'))[:12]}), but the model's "
            f"vocabulary size is {model_vocab_size}; {direction}. Fix: set the model's vocab size to "
            f"{data_vocab}{pad_note} (--vocab-size {data_vocab}), or re-run tools/preprocess_data.py with the "
            f"tokenizer the model was built for"
        )
    if tokenizer is not None and info.get("sha256") and tokenizer.sha256 != info["sha256"]:
        raise DatasetError(
            f"tokenizer mismatch: {manifest_or_prefix} was tokenized with {info.get('path')} (sha256 "
            f"{info['sha256'][:12]}, vocab {data_vocab}) but training loads {tokenizer.path} (sha256 "
            f"{tokenizer.sha256[:12]}, vocab {tokenizer.vocab_size}); pass --tokenizer-model {info.get('path')} "
            f"or re-run tools/preprocess_data.py with {tokenizer.path}"
        )
    return info


# ---------------------------------------------------------------------------------------------- merging


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> dict:
    """Concatenate datasets (in the order given) into one, via IndexedDatasetBuilder.add_index.

    Writes <out>.bin.tmp / <out>.idx.tmp and renames them when complete, then <out>.meta.json.
    """
    prefixes = expand_data_prefixes(prefixes)
    if not prefixes:
        raise DatasetError("nothing to merge: pass at least one dataset prefix")
    infos = [check_dataset_prefix(p) for p in prefixes]
    dtypes = {i["dtype"] for i in infos}
    if len(dtypes) != 1:
        detail = ", ".join(f"{i['prefix']}: {i['dtype']}" for i in infos)
        raise DatasetError(
            f"cannot merge datasets of different token dtypes ({detail}); re-run tools/preprocess_data.py "
            f"with the same --dtype for all of them"
        )
    toks = [tokenizer_info_for(p) for p in prefixes]
    hashes = {t.get("sha256") for t in toks if t}
    if len(hashes) > 1:
        raise DatasetError(
            "cannot merge datasets made with different tokenizers: "
            + ", ".join(f"{p}: {t.get('path') if t else '?'}" for p, t in zip(prefixes, toks))
        )
    out = normalize_prefix(output_prefix)
    if out in prefixes:
        raise DatasetError(f"the output prefix {out} is also an input; choose another --output-prefix")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = np.dtype(infos[0]["dtype"]).type
    tmp_bin, tmp_idx = bin_path(out) + ".tmp", idx_path(out) + ".tmp"
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        # add_index runs gc.collect() per input; with torch and megatron-core loaded each full collection
        # takes a noticeable fraction of a second. Freezing the existing heap keeps them cheap.
        gc.freeze()
        try:
            for p in prefixes:
                builder.add_index(p)
        finally:
            gc.unfreeze()
        builder.finalize(tmp_idx)
        for t in (tmp_bin, tmp_idx):
            with open(t, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp_bin, bin_path(out))
        os.replace(tmp_idx, idx_path(out))
    finally:
        for t in (tmp_bin, tmp_idx):
            if os.path.exists(t):
                os.remove(t)
    info = check_dataset_prefix(out)
    meta = {
        "format": "megatron-tempnet-dataset",
        "version": 1,
        "made_by": "merge_datasets",
        "inputs": [os.path.abspath(p) for p in prefixes],
        "tokenizer": next((t for t in toks if t), None),
        "dtype": info["dtype"],
        "counts": {"docs": info["documents"], "tokens": info["tokens"]},
        "files": {
            "bin": {"bytes": os.path.getsize(bin_path(out)), "sha256": sha256_file(bin_path(out))},
            "idx": {"bytes": os.path.getsize(idx_path(out)), "sha256": sha256_file(idx_path(out))},
        },
    }
    write_json_atomic(meta_path(out), meta)
    return info


# ---------------------------------------------------------------------------------------------- inspection


def dataset_stats(prefix: str) -> dict:
    """Counts and a document-length histogram (power-of-two buckets) of one dataset."""
    info = check_dataset_prefix(prefix)
    s, d = info["sequence_count"], info["document_count"]
    ip = idx_path(info["prefix"])
    lengths = np.memmap(ip, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(s,)) if s else np.zeros(0, np.int32)
    docs = np.memmap(ip, dtype=np.int64, mode="r", offset=HEADER_BYTES + 12 * s, shape=(d,))
    cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    doc_len = cum[np.asarray(docs[1:])] - cum[np.asarray(docs[:-1])] if d > 1 else np.zeros(0, np.int64)
    hist: Dict[str, int] = {}
    if doc_len.size:
        zero = int((doc_len == 0).sum())
        if zero:
            hist["0"] = zero
        pos = doc_len[doc_len > 0]
        if pos.size:
            buckets, counts = np.unique(np.floor(np.log2(pos)).astype(np.int64), return_counts=True)
            for k, c in zip(buckets.tolist(), counts.tolist()):
                hist[f"[{2**k},{2**(k + 1)})"] = int(c)
    info.update(
        doc_length={
            "min": int(doc_len.min()) if doc_len.size else 0,
            "mean": float(doc_len.mean()) if doc_len.size else 0.0,
            "median": float(np.median(doc_len)) if doc_len.size else 0.0,
            "max": int(doc_len.max()) if doc_len.size else 0,
        },
        histogram=hist,
    )
    return info


def read_document(prefix: str, doc: int) -> np.ndarray:
    """Tokens of document `doc` (all its sequences), read through megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(normalize_prefix(prefix), multimodal=False, mmap=True)
    n_docs = len(ds.document_indices) - 1
    if not 0 <= doc < n_docs:
        raise DatasetError(f"document {doc} is out of range: {prefix} has {n_docs} documents (0..{n_docs - 1})")
    beg, end = int(ds.document_indices[doc]), int(ds.document_indices[doc + 1])
    parts = [ds[i] for i in range(beg, end)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tokens_in_sequence_range(prefix: str, beg: int, end: int) -> int:
    """Tokens in sequences [beg, end) of a dataset, from the .idx pointers (O(1) reads)."""
    info = read_index_header(normalize_prefix(prefix))
    s = info["sequence_count"]
    if end <= beg or s == 0:
        return 0
    ip = idx_path(normalize_prefix(prefix))
    itemsize = np.dtype(info["dtype"]).itemsize
    lengths = np.memmap(ip, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(s,))
    pointers = np.memmap(ip, dtype=np.int64, mode="r", offset=HEADER_BYTES + 4 * s, shape=(s,))
    n = (int(pointers[end - 1]) + int(lengths[end - 1]) * itemsize - int(pointers[beg])) // itemsize
    del lengths, pointers
    return n
