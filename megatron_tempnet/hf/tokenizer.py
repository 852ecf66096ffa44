"""A Hugging Face tokenizer (tokenizer.json) that tokenizes exactly like a sentencepiece .model file.

transformers 5 builds its tokenizers on the `tokenizers` library; this writes the equivalent pipeline
of a sentencepiece model directly (no network, no slow tokenizer): its BPE or unigram model with byte
fallback, sentencepiece's whitespace handling (spaces -> "▁", the dummy prefix), and a decoder that
inverts it. tests/test_hf_convert.py checks that the ids agree with sentencepiece on code and text.

Differences: byte-fallback ids that do not form valid UTF-8 decode to different numbers of U+FFFD
(sentencepiece replaces the invalid byte, transformers the whole run of byte pieces); ids are the same.
Control pieces (<s>, </s>, <pad>) are special tokens in Hugging Face, so the literal text
"<s>" becomes one id there and several pieces in sentencepiece. Text never contains them in practice.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

SP_TYPES = {1: "unigram", 2: "bpe"}


def _proto(model_path: str):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # older sentencepiece releases ship the proto only inside transformers
        from transformers.utils import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    with open(model_path, "rb") as f:
        m.ParseFromString(f.read())
    return m


def tokenizer_object(model_path: str):
    """A `tokenizers.Tokenizer` equivalent to the sentencepiece model at `model_path`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    proto = _proto(model_path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    kind = SP_TYPES.get(spec.model_type)
    if kind is None:
        raise ValueError(f"{model_path}: sentencepiece model type {spec.model_type} is not supported (bpe or unigram)")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if kind == "bpe":
        from transformers.tokenization_utils_base import generate_merges

        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        tok = Tokenizer(BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=spec.unk_piece, fuse_unk=True,
                            byte_fallback=spec.byte_fallback, dropout=None))
    else:
        tok = Tokenizer(Unigram(vocab=pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback))

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " ")]
    if spec.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    # control (3) and user-defined (4) pieces
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=p.type == 3) for p in proto.pieces if p.type in (3, 4)])
    return tok


def save_hf_tokenizer(model_path: str, out_dir: str | Path, model_max_length: Optional[int] = None) -> dict:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (and a copy of the .model as
    tokenizer.model) for `AutoTokenizer.from_pretrained(out_dir)`. Returns the special token ids."""
    from transformers import PreTrainedTokenizerFast

    proto = _proto(model_path)
    spec = proto.trainer_spec
    names = {}
    for attr, idx in (("unk_token", spec.unk_id), ("bos_token", spec.bos_id), ("eos_token", spec.eos_id),
                      ("pad_token", spec.pad_id)):
        if 0 <= idx < len(proto.pieces):
            names[attr] = proto.pieces[idx].piece
    kwargs = dict(names)
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer_object(model_path), clean_up_tokenization_spaces=False,
                                  **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    shutil.copyfile(model_path, out / "tokenizer.model")
    ids = {attr: idx for attr, idx in (("unk", spec.unk_id), ("bos", spec.bos_id), ("eos", spec.eos_id),
                                        ("pad", spec.pad_id)) if 0 <= idx < len(proto.pieces)}
    return ids
