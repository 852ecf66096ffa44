"""Tokenizer training and the tokenizer wrapper (sentencepiece; Hugging Face folders when installed)."""
import json
import pickle
import random
import shutil

import numpy as np
import pytest

from megatron_tempnet.data.inputs import iter_texts
from megatron_tempnet.data.tokenizer import (
    SentencePieceTokenizer,
    TokenizerError,
    TrainError,
    load_tokenizer,
    train_sentencepiece,
)

WORDS = ("the of and to in is for that with on as by data model token layer tensor rank shard "
         "parallel pipeline gradient loss temperature robust sample batch def return self import").split()


def make_texts(n=200, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(1, 6)):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            lines.append(("    " if i % 3 == 0 else "") + words)
        out.append("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    summary = train_sentencepiece(make_texts(), str(d / "tok"), 300, threads=1)
    return summary["model"]


def test_train_and_load_sentencepiece(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 300
    assert (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, 3)
    assert tok.eos == tok.eod
    assert len(tok.sha256) == 64
    assert open(sp_model[:-6] + ".vocab", encoding="utf-8").read().startswith("<unk>\t")


def test_round_trip_is_exact_for_code_and_unseen_characters(sp_model):
    tok = load_tokenizer(sp_model)
    for text in ["def f(x):\n\treturn x  # two  spaces\n\n", "naïve café 日本 🙂 Ω\n", "  leading and trailing  "]:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    # byte fallback: unseen characters become byte pieces, never <unk>
    assert tok.unk not in tok.tokenize("日本 🙂")
    assert tok.tokenize_batch(["a b", "data model"]) == [tok.tokenize("a b"), tok.tokenize("data model")]


def test_identity_and_hash_do_not_depend_on_path(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    copy = tmp_path / "elsewhere.model"
    shutil.copy(sp_model, copy)
    tok2 = load_tokenizer(str(copy))
    assert tok2.sha256 == tok.sha256
    assert dict(tok2.unique_identifiers) == dict(tok.unique_identifiers)
    assert "sha256" in tok.unique_identifiers and str(tmp_path) not in json.dumps(tok2.unique_identifiers)
    # pickles by path and re-checks the content on load
    tok3 = pickle.loads(pickle.dumps(tok))
    assert tok3.tokenize("data model") == tok.tokenize("data model")


def test_training_is_deterministic_and_unigram_works(tmp_path):
    a = train_sentencepiece(make_texts(), str(tmp_path / "a"), 300, threads=1)
    b = train_sentencepiece(make_texts(), str(tmp_path / "b"), 300, threads=1)
    assert a["sha256"] == b["sha256"]
    u = train_sentencepiece(make_texts(), str(tmp_path / "u"), 300, model_type="unigram", threads=1)
    tok = load_tokenizer(u["model"])
    assert tok.vocab_size == 300 and tok.detokenize(tok.tokenize("the data\n")) == "the data\n"


def test_special_tokens_and_input_cap(tmp_path):
    texts = make_texts(400)
    s = train_sentencepiece(iter(texts), str(tmp_path / "s"), 300, special_tokens=["<|user|>"], max_input_mb=0.002, threads=1)
    assert s["input_capped"] and s["chars_read"] < sum(map(len, texts)) / 4
    tok = load_tokenizer(s["model"])
    assert tok.id_to_piece(4) == "<|user|>"  # control symbols follow unk/bos/eos/pad


def test_streams_jsonl_and_text_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello data"}) + "\n{broken\n" + json.dumps({"other": 1}) + "\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("plain text file")
    got = list(iter_texts([str(tmp_path / "a.jsonl"), str(tmp_path / "docs")]))
    assert got == ["hello data", "plain text file"]


def test_training_errors(tmp_path):
    with pytest.raises(TrainError, match="too small"):
        train_sentencepiece(make_texts(), str(tmp_path / "x"), 100)
    with pytest.raises(TrainError, match="vocab"):
        train_sentencepiece(["tiny text"], str(tmp_path / "y"), 5000, threads=1)
    with pytest.raises(TrainError, match="no text"):
        train_sentencepiece([], str(tmp_path / "z"), 300)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(bad)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TokenizerError, match="folder"):
        load_tokenizer(tmp_path / "empty_dir")


def make_hf_tokenizer(folder, vocab_size):
    """A word-level Hugging Face tokenizer with `vocab_size` ids (eos = id 1)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<unk>", "</s>", "<pad>"] + WORDS + [f"w{i}" for i in range(vocab_size - 3 - len(WORDS))]
    vocab = {w: i for i, w in enumerate(words)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return str(folder)


def test_hugging_face_folder(tmp_path):
    folder = make_hf_tokenizer(tmp_path / "hf", 1000)
    tok = load_tokenizer(folder)
    assert tok.kind == "huggingface" and tok.vocab_size == 1000
    assert tok.eod == 1 and tok.pad == 2
    ids = tok.tokenize("the data w5")
    assert ids == [3 + WORDS.index("the"), 3 + WORDS.index("data"), 3 + len(WORDS) + 5]
    assert tok.detokenize(ids) == "the data w5"
    assert len(tok.sha256) == 64


def test_byte_level_bpe_training_round_trip_and_backends(tmp_path):
    pytest.importorskip("transformers")
    from megatron_tempnet.data.bpe_training import train_byte_level_bpe

    summary = train_byte_level_bpe(make_texts(), str(tmp_path / "bpe"), 400, special_tokens=["<|user|>"], threads=1)
    assert 300 < summary["vocab_size"] <= 400 and not (tmp_path / "bpe.tmp").exists()  # small text: fewer merges
    for path in (summary["model"], str(tmp_path / "bpe" / "tokenizer.json")):
        tok = load_tokenizer(path)
        assert tok.kind == "huggingface" and tok.vocab_size == summary["vocab_size"]
        assert (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, 3) and tok.sha256 == summary["sha256"]
    texts = ["def f(x):\n\treturn x  # two  spaces\n\n", "naïve café 日本 🙂 Ω\n", "  leading and trailing  "]
    for text in texts:
        assert tok.detokenize(tok.tokenize(text)) == text  # byte-level: nothing is unknown
    assert 4 in tok.tokenize("a <|user|> b")  # a special token in text is that token, as in transformers
    for backend in ("hf", "gigatoken", "auto"):
        if backend == "gigatoken":
            pytest.importorskip("gigatoken")
        tokens, lengths = tok.batch_encoder(backend, threads=2).encode(texts)
        assert [t.tolist() for t in np.split(tokens, np.cumsum(lengths)[:-1])] == tok.tokenize_batch(texts)


def test_byte_level_bpe_errors(tmp_path):
    from megatron_tempnet.data.bpe_training import train_byte_level_bpe

    with pytest.raises(TrainError, match="too small"):
        train_byte_level_bpe(make_texts(), str(tmp_path / "x"), 100)
    with pytest.raises(TrainError, match="no text"):
        train_byte_level_bpe([], str(tmp_path / "y"), 400)
    assert not (tmp_path / "y").exists()
