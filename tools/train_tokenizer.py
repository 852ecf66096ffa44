#!/usr/bin/env python
r"""Train a tokenizer from JSONL / text files, streaming: sentencepiece (BPE or unigram) or byte-level BPE.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text \
        --model-prefix out/tok --vocab-size 32000 [--model-type bpe] [--threads 8]
    # -> out/tok.model, out/tok.vocab; prints one JSON summary line
    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix out/tok --vocab-size 32000 \
        --model-type byte-bpe
    # -> out/tok/tokenizer.json (+ tokenizer_config.json): a Hugging Face tokenizer folder, trained with
    #    the `tokenizers` library; byte-level BPE is the fastest format to encode

Pass the .model file, or the folder, as --tokenizer-model to preprocessing and training.

Ids: unk=0, bos=1, eos=2 (end of document), pad=3, then --special-tokens, --user-defined-symbols, then
learned pieces. Text is kept verbatim (whitespace and newlines preserved: round-trips code), and byte
fallback (on by default) spells unseen characters as bytes instead of <unk>.

byte-bpe uses the same special pieces and ids; it needs no byte fallback (every byte is a symbol).

Large corpora: the input is streamed; sentencepiece it keeps a random sample of at most
--sample-size text pieces (each at most --max-piece-bytes), and --max-input-mb stops reading early.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_tempnet.cli_help import HelpFormatter  # noqa: E402  (after the path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl/.json, optionally .gz) or text files, or folders of them")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys whose text is used (default: text)")
    p.add_argument("--text-mode", choices=["file", "line"], default="file", help="plain text: one document per file or per line")
    p.add_argument("--model-prefix", required=True, help="output path without extension: writes PREFIX.model and PREFIX.vocab (byte-bpe: the folder PREFIX/)")
    p.add_argument("--vocab-size", type=int, default=32000, help="pieces in the vocabulary, special ones included")
    p.add_argument("--model-type", choices=["bpe", "unigram", "byte-bpe"], default="bpe",
                   help="sentencepiece bpe / unigram, or byte-level BPE with Hugging Face tokenizers")
    p.add_argument("--min-frequency", type=int, default=2, help="byte-bpe: merge only pairs seen this often")
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false", help="map unknown characters to <unk> instead of bytes")
    p.add_argument("--unk-piece", default="<unk>", help="unknown-token piece")
    p.add_argument("--bos-piece", default="<s>", help="beginning-of-sentence piece")
    p.add_argument("--eos-piece", default="</s>", help="end-of-sentence piece, used as the end-of-document token")
    p.add_argument("--pad-piece", default="<pad>", help="padding piece")
    p.add_argument("--special-tokens", nargs="*", default=[], help="extra control tokens (never produced from text)")
    p.add_argument("--user-defined-symbols", nargs="*", default=[], help="strings always kept as one piece when found in text")
    p.add_argument("--threads", type=int, default=0, help="training threads (default: all cores)")
    p.add_argument("--sample-size", type=int, default=1_000_000, help="at most this many text pieces are sampled for training")
    p.add_argument("--max-input-mb", type=float, default=None, help="stop reading the input after about this many MB of text")
    p.add_argument("--max-piece-bytes", type=int, default=8192, help="texts are cut at line ends into pieces of at most this size")
    p.add_argument("--character-coverage", type=float, default=0.9999, help="fraction of the characters seen that get "
                   "a piece of their own (the rarest others fall back to bytes)")
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false", help="let pieces join digits (by "
                   "default every digit is its own piece)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling of training text")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_tempnet.data.inputs import expand_inputs, iter_texts
    from megatron_tempnet.data.tokenizer import train_sentencepiece

    expand_inputs(args.input)  # fail early and clearly on missing inputs
    if args.model_type == "byte-bpe":
        from megatron_tempnet.data.bpe_training import train_byte_level_bpe

        summary = train_byte_level_bpe(
            iter_texts(args.input, args.json_keys, args.text_mode), args.model_prefix, args.vocab_size,
            unk_piece=args.unk_piece, bos_piece=args.bos_piece, eos_piece=args.eos_piece, pad_piece=args.pad_piece,
            special_tokens=args.special_tokens, user_defined_symbols=args.user_defined_symbols,
            min_frequency=args.min_frequency, max_input_mb=args.max_input_mb, threads=args.threads,
        )
        print(json.dumps(summary))
        return 0
    summary = train_sentencepiece(
        iter_texts(args.input, args.json_keys, args.text_mode),
        args.model_prefix,
        args.vocab_size,
        model_type=args.model_type,
        byte_fallback=args.byte_fallback,
        unk_piece=args.unk_piece,
        bos_piece=args.bos_piece,
        eos_piece=args.eos_piece,
        pad_piece=args.pad_piece,
        special_tokens=args.special_tokens,
        user_defined_symbols=args.user_defined_symbols,
        threads=args.threads,
        sample_size=args.sample_size,
        max_input_mb=args.max_input_mb,
        max_piece_bytes=args.max_piece_bytes,
        character_coverage=args.character_coverage,
        split_digits=args.split_digits,
        seed=args.seed,
        verbose=args.verbose,
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from megatron_tempnet.cli import run

    sys.exit(run(main))
