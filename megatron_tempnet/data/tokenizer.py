"""Tokenizers with the interface megatron-core's GPTDataset (and our tools) need.

    tok = load_tokenizer("tok.model")          # sentencepiece model file
    tok = load_tokenizer("path/to/hf_folder")  # Hugging Face tokenizer folder (needs transformers), e.g.
                                               # from tools/train_tokenizer.py --model-type byte-bpe
    ids = tok.tokenize("def f(x):\\n    return x\\n")
    text = tok.detokenize(ids)

Every tokenizer has:
    vocab_size          number of ids (ids are 0 .. vocab_size - 1)
    eod / eos           the end-of-document id appended by preprocess_data --append-eod
    bos, pad, unk       ids, or -1 when the model has none
    unique_identifiers  dict that megatron-core hashes into its index-cache names; it holds the content
                        hash, never the path, so the same tokenizer copied elsewhere reuses the caches
    sha256              stable content hash of the model file (or of the tokenizer folder's files)
    path                where it was loaded from
    tokenize(text) -> list[int]; tokenize_batch(texts) -> list[list[int]]; detokenize(ids) -> str
    batch_encoder(backend, threads) an encoders.Encoder (numpy ids, a faster backend) for large batches

Tokenizer objects pickle by path + hash (the file is reloaded, and checked, on unpickling).
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from ..files import atomic_write_bytes, atomic_write_text, sha256_file

# Files that define a Hugging Face tokenizer folder; hashed (when present) in this order.
_HF_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used. The message names the problem and the fix."""


def tokenizer_hash(path: str | os.PathLike) -> str:
    """Content hash of a tokenizer: a sentencepiece .model file, or a Hugging Face tokenizer folder."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        found = False
        for name in _HF_FILES:
            f = p / name
            if f.is_file():
                found = True
                h.update(name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
        if not found:
            raise TokenizerError(f"{p} is a folder without tokenizer files ({', '.join(_HF_FILES[:3])}, ...)")
        return h.hexdigest()
    return sha256_file(p)


class _TokenizerBase:
    kind = "base"

    path: str
    sha256: str

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        # megatron-core json-dumps this into the description of every cached index, so it names the
        # tokenizer by content: the same model at another path (another node) hits the same cache.
        return OrderedDict(
            [("class", type(self).__name__), ("sha256", self.sha256), ("vocab_size", self.vocab_size)]
        )

    _vocab_size: int
    _eos: int
    _bos: int
    _pad: int
    _unk: int
    _no_eos_message: str

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        if self._eos < 0:
            raise TokenizerError(self._no_eos_message.format(path=self.path))
        return self._eos

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def unk(self) -> int:
        return self._unk

    def info(self) -> dict:
        """What preprocess_data records in its manifest."""
        return {
            "type": self.kind,
            "path": os.path.abspath(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "bos": self.bos,
            "pad": self.pad,
        }

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def batch_encoder(self, backend: str = "auto", threads: int = 1):
        """An encoders.Encoder for this tokenizer: encode(texts) -> (tokens, lengths) numpy arrays, with
        the reference library's ids whatever the backend (auto | sentencepiece | hf | gigatoken)."""
        from megatron_tempnet.data.encoders import make_encoder

        return make_encoder(self, backend, threads)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


class SentencePieceTokenizer(_TokenizerBase):
    """A sentencepiece .model file (as written by tools/train_tokenizer.py or any other trainer)."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike, expected_sha256: str | None = None):
        import sentencepiece as spm

        self.path = str(model_path)
        if not os.path.isfile(self.path):
            raise TokenizerError(
                f"tokenizer model {self.path} does not exist; train one with tools/train_tokenizer.py "
                f"or pass the path of an existing sentencepiece .model file"
            )
        with open(self.path, "rb") as f:
            blob = f.read()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        if expected_sha256 is not None and expected_sha256 != self.sha256:
            raise TokenizerError(
                f"tokenizer model {self.path} changed (sha256 {self.sha256[:12]}, expected "
                f"{expected_sha256[:12]}); do not overwrite a tokenizer while it is in use"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(blob)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with a terse message
            raise TokenizerError(
                f"{self.path} is not a sentencepiece model ({e}); pass a .model file written by "
                f"sentencepiece (tools/train_tokenizer.py) or a Hugging Face tokenizer folder"
            ) from None
        self._vocab_size = int(self._sp.GetPieceSize())
        self._eos = int(self._sp.eos_id())
        self._bos = int(self._sp.bos_id())
        self._pad = int(self._sp.pad_id())
        self._unk = int(self._sp.unk_id())

    # -- megatron-core interface --
    _no_eos_message = ("{path} has no end-of-sentence piece (eos_id=-1), which is needed as the end-of-document "
                       "token; retrain it with tools/train_tokenizer.py (it always defines eos)")

    # -- text <-> ids --
    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # one thread: preprocess_data parallelises with processes, not with sentencepiece's threads
        return self._sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # -- pickling: by path, re-verified on load --
    def __getstate__(self):
        return {"path": self.path, "sha256": self.sha256}

    def __setstate__(self, state):
        self.__init__(state["path"], expected_sha256=state["sha256"])


class HFTokenizer(_TokenizerBase):
    """A Hugging Face tokenizer folder (tokenizer.json / tokenizer_config.json); needs transformers."""

    kind = "huggingface"

    def __init__(self, folder: str | os.PathLike, expected_sha256: str | None = None):
        self.path = str(folder)
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError(
                f"{self.path} is a Hugging Face tokenizer folder, which needs transformers: "
                f"pip install 'megatron-tempnet[hf]' (or use a sentencepiece .model file)"
            ) from None
        self.sha256 = tokenizer_hash(self.path)
        if expected_sha256 is not None and expected_sha256 != self.sha256:
            raise TokenizerError(
                f"tokenizer folder {self.path} changed (sha256 {self.sha256[:12]}, expected {expected_sha256[:12]})"
            )
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path)
        except Exception as e:
            raise TokenizerError(f"cannot load a Hugging Face tokenizer from {self.path}: {e}") from None
        self._vocab_size = len(self._tok)
        t = self._tok
        self._eos = t.eos_token_id if t.eos_token_id is not None else -1
        self._bos = t.bos_token_id if t.bos_token_id is not None else -1
        self._pad = t.pad_token_id if t.pad_token_id is not None else -1
        self._unk = t.unk_token_id if t.unk_token_id is not None else -1

    _no_eos_message = ("the Hugging Face tokenizer at {path} has no eos_token, which is needed as the "
                       "end-of-document token; set eos_token in its tokenizer_config.json")

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._tok.convert_ids_to_tokens(int(i))

    def __getstate__(self):
        return {"path": self.path, "sha256": self.sha256}

    def __setstate__(self, state):
        self.__init__(state["path"], expected_sha256=state["sha256"])


Tokenizer = _TokenizerBase


def load_tokenizer(path: str | os.PathLike) -> _TokenizerBase:
    """A sentencepiece .model file -> SentencePieceTokenizer; a folder (or its tokenizer.json) -> HFTokenizer."""
    p = Path(path)
    if p.name == "tokenizer.json" and p.is_file():
        p = p.parent  # the folder holds the special-token settings beside it
    if p.is_dir():
        if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
            return HFTokenizer(p)
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return SentencePieceTokenizer(models[0])
        raise TokenizerError(
            f"{p} is a folder with neither tokenizer.json/tokenizer_config.json (Hugging Face) nor a single "
            f"sentencepiece .model file; pass the .model file or the Hugging Face tokenizer folder"
        )
    if not p.exists():
        raise TokenizerError(
            f"tokenizer {p} does not exist; train one with tools/train_tokenizer.py or pass an existing "
            f"sentencepiece .model file / Hugging Face tokenizer folder"
        )
    return SentencePieceTokenizer(p)


# ---------------------------------------------------------------------------------------------- training


class TrainError(ValueError):
    """Tokenizer training that cannot run or failed. The message names the problem and the fix."""


def _split_for_training(text: str, max_bytes: int) -> Iterable[str]:
    """Pieces of at most max_bytes UTF-8 bytes, cut at line ends (sentencepiece drops longer sentences)."""
    if len(text) * 4 <= max_bytes or len(text.encode("utf-8")) <= max_bytes:
        yield text
        return
    buf: List[str] = []
    n = 0
    step = max(1, max_bytes // 4)
    for line in text.splitlines(keepends=True):
        b = len(line.encode("utf-8"))
        if b > max_bytes:  # one very long line: cut it by characters
            if buf:
                yield "".join(buf)
                buf, n = [], 0
            for i in range(0, len(line), step):
                yield line[i : i + step]
            continue
        if n + b > max_bytes and buf:
            yield "".join(buf)
            buf, n = [], 0
        buf.append(line)
        n += b
    if buf:
        yield "".join(buf)


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    unk_piece: str = "<unk>",
    bos_piece: str = "<s>",
    eos_piece: str = "</s>",
    pad_piece: str = "<pad>",
    special_tokens: Sequence[str] = (),
    user_defined_symbols: Sequence[str] = (),
    threads: int = 0,
    sample_size: int = 1_000_000,
    max_input_mb: Optional[float] = None,
    max_piece_bytes: int = 8192,
    character_coverage: float = 0.9999,
    split_digits: bool = True,
    seed: int = 0,
    verbose: bool = False,
) -> dict:
    """Train a sentencepiece model from an iterator of texts, streaming; writes <model_prefix>.model/.vocab.

    Ids: unk=0, bos=1, eos=2 (the end-of-document token), pad=3, then `special_tokens` (control symbols,
    never produced from text), `user_defined_symbols` (matched in text), then the learned pieces.
    Text is kept verbatim (identity normalization, whitespace preserved), so detokenize(tokenize(x)) == x,
    which code needs; with byte_fallback, characters outside the vocabulary become byte pieces, never <unk>.

    Memory: texts are cut into pieces of at most max_piece_bytes and streamed to sentencepiece through
    sentence_iterator; sentencepiece keeps a uniform random sample (reservoir) of at most `sample_size`
    pieces. `max_input_mb` stops reading after that many MB of text (for corpora too large to scan).
    Returns a summary dict (model path, vocab size, pieces and bytes read, seconds).
    """
    # Over 100 lines: one trainer call with sentencepiece's many options and the translation of its errors.
    import io
    import time

    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise TrainError(f"--model-type {model_type} is not supported; use bpe or unigram")
    n_special = 4 + len(special_tokens) + len(user_defined_symbols)
    minimum = n_special + (256 if byte_fallback else 0) + 1
    if vocab_size < minimum:
        raise TrainError(
            f"--vocab-size {vocab_size} is too small: {n_special} special pieces"
            f"{' + 256 byte-fallback pieces' if byte_fallback else ''} leave no room for learned pieces; "
            f"use at least {minimum} (typically thousands)"
        )
    stats = {"pieces": 0, "bytes": 0, "capped": False}
    cap = None if max_input_mb is None else int(max_input_mb * 1e6)

    def sentences():
        for t in texts:
            for piece in _split_for_training(t, max_piece_bytes):
                if not piece.strip():
                    continue
                stats["pieces"] += 1
                stats["bytes"] += len(piece)
                yield piece
            if cap is not None and stats["bytes"] >= cap:
                stats["capped"] = True
                return

    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    t0 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=unk_piece,
            bos_piece=bos_piece,
            eos_piece=eos_piece,
            pad_piece=pad_piece,
            control_symbols=list(special_tokens),
            user_defined_symbols=list(user_defined_symbols),
            num_threads=threads if threads and threads > 0 else (os.cpu_count() or 1),
            input_sentence_size=sample_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_piece_bytes,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        msg = str(e)
        if stats["pieces"] == 0:
            raise TrainError(
                "no text to train on: the inputs are empty or every record was unusable (check --json-keys)"
            ) from None
        if "Vocabulary size is too high" in msg or "vocab_size" in msg.lower():
            raise TrainError(
                f"sentencepiece cannot reach --vocab-size {vocab_size} from {stats['bytes']:,} characters of text "
                f"({msg.strip()}); lower --vocab-size or give more text"
            ) from None
        raise TrainError(f"sentencepiece training failed: {msg.strip()}") from None
    if stats["pieces"] == 0:
        raise TrainError("no text to train on: the inputs are empty or every record was unusable (check --json-keys)")
    # write .model then .vocab via temporary names, so a crash never leaves a partial model file
    path = model_prefix + ".model"
    atomic_write_bytes(path, model.getvalue())
    tok = SentencePieceTokenizer(path)
    atomic_write_text(model_prefix + ".vocab", "".join(
        f"{tok._sp.id_to_piece(i)}\t{tok._sp.get_score(i)}\n" for i in range(tok.vocab_size)))
    return {
        "model": path,
        "vocab_size": tok.vocab_size,
        "sha256": tok.sha256,
        "pieces_read": stats["pieces"],
        "chars_read": stats["bytes"],
        "input_capped": stats["capped"],
        "seconds": round(time.time() - t0, 2),
    }
