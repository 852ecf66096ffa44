"""Train a byte-level BPE tokenizer with Hugging Face `tokenizers`; writes a tokenizer folder.

    summary = train_byte_level_bpe(iter_texts(["corpus.jsonl"]), "out/tok", 32000)
    # -> out/tok/tokenizer.json, out/tok/tokenizer_config.json, out/tok/special_tokens_map.json

Byte-level BPE (GPT-2's scheme) spells any text with its 256 byte symbols, so nothing is ever unknown
and decode(encode(x)) == x for every string; it is also the fastest format to encode. The folder loads
with data.tokenizer.load_tokenizer (and with transformers' AutoTokenizer), so it serves preprocessing,
training, generation and the Hugging Face export as a sentencepiece .model does.

Ids follow tools/train_tokenizer.py's sentencepiece models: <unk>=0, <s>=1, </s>=2 (the end-of-document
token), <pad>=3, then `special_tokens`, then `user_defined_symbols`, then the 256 bytes and the merges.
As in every Hugging Face tokenizer, special tokens written in a text are read as those tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Iterable, Optional, Sequence

from megatron_tempnet.data.tokenizer import TrainError


def train_byte_level_bpe(
    texts: Iterable[str],
    output_dir: str,
    vocab_size: int,
    *,
    unk_piece: str = "<unk>",
    bos_piece: str = "<s>",
    eos_piece: str = "</s>",
    pad_piece: str = "<pad>",
    special_tokens: Sequence[str] = (),
    user_defined_symbols: Sequence[str] = (),
    min_frequency: int = 2,
    max_input_mb: Optional[float] = None,
    threads: int = 0,
) -> dict:
    """Train from an iterator of texts (streamed; `max_input_mb` stops reading early). Returns a summary
    dict (folder, vocab size, sha256, texts and characters read, seconds)."""
    if threads and threads > 0:
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # read when the trainer's pool starts
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [unk_piece, bos_piece, eos_piece, pad_piece, *special_tokens, *user_defined_symbols]
    minimum = len(specials) + 256 + 1
    if vocab_size < minimum:
        raise TrainError(
            f"--vocab-size {vocab_size} is too small: {len(specials)} special pieces + 256 byte pieces leave no "
            f"room for merges; use at least {minimum} (typically thousands)"
        )
    stats = {"texts": 0, "chars": 0, "capped": False}
    cap = None if max_input_mb is None else int(max_input_mb * 1e6)

    def stream():
        for t in texts:
            stats["texts"] += 1
            stats["chars"] += len(t)
            yield t
            if cap is not None and stats["chars"] >= cap:
                stats["capped"] = True
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    t0 = time.time()
    tok.train_from_iterator(stream(), trainer=trainer)
    if stats["texts"] == 0:
        raise TrainError("no text to train on: the inputs are empty or every record was unusable (check --json-keys)")
    _save_folder(tok, output_dir, unk_piece, bos_piece, eos_piece, pad_piece)
    from megatron_tempnet.data.tokenizer import tokenizer_hash

    return {
        "model": output_dir,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "sha256": tokenizer_hash(output_dir),
        "texts_read": stats["texts"],
        "chars_read": stats["chars"],
        "input_capped": stats["capped"],
        "seconds": round(time.time() - t0, 2),
    }


def _save_folder(tok, output_dir: str, unk: str, bos: str, eos: str, pad: str) -> None:
    """tokenizer.json + the two small files transformers reads, written to a temporary folder that is
    renamed into place: a crash never leaves a half-written tokenizer."""
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    named = {"unk_token": unk, "bos_token": bos, "eos_token": eos, "pad_token": pad}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1 << 30, **named}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", named)):
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
