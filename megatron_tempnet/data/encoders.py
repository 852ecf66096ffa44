"""Batch encoders behind a tokenizer: the reference library, or a faster one that gives the same ids.

    enc = make_encoder(tok, backend="auto", threads=2)   # tok: a data.tokenizer wrapper
    tokens, lengths = enc.encode(["first doc", "second doc"])
    # tokens: int array (sum(lengths),), the documents' ids back to back; lengths: int64 (docs,)

Backends:
  sentencepiece  the sentencepiece library itself (reference for .model files), encode(list, num_threads)
  hf             the Hugging Face `tokenizers` library (reference for tokenizer.json folders)
  gigatoken      gigatoken, a Rust tokenizer that reads both formats (sentencepiece BPE with byte fallback,
                 tokenizer.json); it fans a batch out over a thread pool
  auto           gigatoken when it is installed and reads the model, else the reference library

Whatever the backend, the ids must be the reference library's: `ParityCheck` compares a faster backend
with the reference on the first documents of a run and refuses to go on if they differ, and a batch on
which a faster backend raises is encoded by the reference instead.

Threads. sentencepiece takes its thread count per call. The Rust libraries use a process-wide pool
sized by RAYON_NUM_THREADS when it is first used; make_encoder sets that variable (unless the user
has) before the first encode, so --workers N means N tokenizer threads.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
from importlib import metadata
from typing import List, Sequence, Tuple

import numpy as np

from megatron_tempnet.data.tokenizer import TokenizerError

BACKENDS = ("auto", "sentencepiece", "hf", "gigatoken")


class BackendError(TokenizerError):
    """A backend that cannot be used, or that disagrees with the reference. The message names the fix."""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _flatten(ids: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (tokens int64 (total,), lengths int64 (docs,)) without a Python loop per token."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return tokens, lengths


class Encoder:
    """encode(texts) -> (tokens, lengths). `name` and `version` go into the manifest."""

    name = "base"
    package = ""

    @property
    def version(self) -> str:
        return _version(self.package)

    def encode(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def info(self) -> dict:
        return {"backend": self.name, "version": self.version}


class SentencePieceEncoder(Encoder):
    name = package = "sentencepiece"

    def __init__(self, tok, threads: int):
        self._sp = tok._sp
        self._threads = max(1, threads)

    def encode(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        return _flatten(self._sp.encode(texts, num_threads=self._threads))


class HFEncoder(Encoder):
    """The `tokenizers` library behind a transformers fast tokenizer (what transformers itself calls)."""

    name = "hf"
    package = "tokenizers"

    def __init__(self, tok, threads: int):
        self._tok = getattr(tok._tok, "backend_tokenizer", None)
        if self._tok is None:  # a slow (pure Python) transformers tokenizer: only transformers can run it
            self._slow = tok
            self.package = "transformers"

    def encode(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        if self._tok is None:
            return _flatten(self._slow.tokenize_batch(texts))
        return _flatten([e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)])


class GigatokenEncoder(Encoder):
    name = package = "gigatoken"

    def __init__(self, tokenizer, threads: int):
        self._tok = tokenizer
        self._parallel = threads > 1

    def encode(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        layout = self._tok.encode_batch(texts, parallel=self._parallel).layout
        offsets = np.asarray(layout.offsets.data)
        return np.asarray(layout.content.data)[offsets[0] : offsets[-1]], np.diff(offsets).astype(np.int64)


def _sentencepiece_json_for_gigatoken(tok) -> str:
    """The .model as tokenizer.json, without its control pieces (<s>, </s>, <pad>) as added tokens:
    sentencepiece never matches control pieces in text, while tokenizer.json added tokens are matched,
    so "<s>" in a document would otherwise become one id instead of three pieces."""
    from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

    with open(tok.path, "rb") as f:
        data = json.loads(sentencepiece_to_tokenizer_json(f.read()))
    sp = tok._sp
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if not sp.IsControl(int(t["id"]))]
    return json.dumps(data)


def _load_gigatoken(tok):
    """A gigatoken.Tokenizer for our tokenizer wrapper, or raise (ImportError / the reader's error)."""
    import gigatoken

    if tok.kind == "sentencepiece":
        return gigatoken.Tokenizer.from_json(_sentencepiece_json_for_gigatoken(tok))
    path = os.path.join(tok.path, "tokenizer.json")
    if not os.path.isfile(path):
        raise BackendError(f"{tok.path} has no tokenizer.json")
    return gigatoken.Tokenizer(path)


def reference_encoder(tok, threads: int) -> Encoder:
    return SentencePieceEncoder(tok, threads) if tok.kind == "sentencepiece" else HFEncoder(tok, threads)


def _set_rust_threads(threads: int) -> None:
    # Read by the Rust libraries' thread pools when they start; a user's own setting wins.
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, threads)))


def make_encoder(tok, backend: str = "auto", threads: int = 1, say=None) -> Encoder:
    """The encoder for `tok` (a SentencePieceTokenizer or HFTokenizer) with the asked-for backend.

    A backend that does not fit the tokenizer's format is an error; gigatoken that is not installed or
    cannot read the model falls back to the reference library, with one line through `say` saying so.
    """
    say = say or (lambda msg: print(msg, file=sys.stderr))
    if backend not in BACKENDS:
        raise BackendError(f"--tokenizer-backend {backend} is not one of {', '.join(BACKENDS)}")
    ref = "sentencepiece" if tok.kind == "sentencepiece" else "hf"
    if backend in ("sentencepiece", "hf") and backend != ref:
        what = "a sentencepiece .model file" if ref == "sentencepiece" else "a Hugging Face tokenizer"
        raise BackendError(
            f"--tokenizer-backend {backend} cannot run {tok.path}, which is {what}; use {ref}, gigatoken or auto"
        )
    _set_rust_threads(threads)
    if backend in ("auto", "gigatoken"):
        try:
            return GigatokenEncoder(_load_gigatoken(tok), threads)
        except Exception as e:  # noqa: BLE001  (not installed, or a model it does not read)
            reason = "it is not installed" if isinstance(e, ImportError) else f"it cannot read this model ({e})"
            if backend == "gigatoken" or not isinstance(e, ImportError):
                say(f"[preprocess] tokenizer backend gigatoken: {reason}; using {ref} {_version(reference_encoder(tok, 1).package)} instead")
    return reference_encoder(tok, threads)


class ParityCheck:
    """Compare a backend's ids with the reference library's on the first `docs` documents (at most
    `max_bytes` of text), raising BackendError at the first difference."""

    def __init__(self, encoder: Encoder, reference: Encoder, docs: int = 256, max_bytes: int = 1 << 20):
        self.encoder, self.reference = encoder, reference
        self.docs_left = docs if encoder.name != reference.name else 0
        self.bytes_left = max_bytes
        self.checked = 0

    def check(self, texts: List[str], tokens: np.ndarray, lengths: np.ndarray, where) -> None:
        """texts and their ids from the backend; where(i) names document i for the message."""
        if self.docs_left <= 0 or self.bytes_left <= 0 or not texts:
            return
        n = 0
        while n < min(len(texts), self.docs_left) and self.bytes_left > 0:
            self.bytes_left -= len(texts[n])
            n += 1
        ref_tokens, ref_lengths = self.reference.encode(texts[:n])
        got_end = int(lengths[:n].sum())
        if np.array_equal(ref_lengths, lengths[:n]) and np.array_equal(ref_tokens, tokens[:got_end]):
            self.docs_left -= n
            self.checked += n
            return
        starts = np.concatenate([[0], np.cumsum(ref_lengths)])
        got_starts = np.concatenate([[0], np.cumsum(lengths[:n])])
        for i in range(n):
            a = ref_tokens[starts[i] : starts[i + 1]]
            b = tokens[got_starts[i] : got_starts[i + 1]]
            if not np.array_equal(a, b):
                k = next((j for j in range(min(a.size, b.size)) if a[j] != b[j]), min(a.size, b.size))
                raise BackendError(
                    f"tokenizer backend {self.encoder.name} {self.encoder.version} gives other ids than "
                    f"{self.reference.name} {self.reference.version} for {where(i)} (token {k}: "
                    f"{b[k:k + 3].tolist()} instead of {a[k:k + 3].tolist()}); nothing was written for it: "
                    f"rerun with --tokenizer-backend {self.reference.name}"
                )


def encode_checked(encoder: Encoder, reference: Encoder, texts: List[str], say) -> Tuple[np.ndarray, np.ndarray]:
    """encoder.encode(texts); if a faster backend raises on the batch, the reference encodes it."""
    try:
        return encoder.encode(texts)
    except Exception as e:  # noqa: BLE001
        if encoder is reference:
            raise
        say(f"[preprocess] tokenizer backend {encoder.name} failed on a batch ({type(e).__name__}: {e}); "
            f"encoded it with {reference.name}")
        return reference.encode(texts)


def describe(encoder: Encoder, reference: Encoder) -> dict:
    """What the manifest records about the encoding: the backend and the reference, with versions."""
    return {**encoder.info(), "reference": reference.info()}
