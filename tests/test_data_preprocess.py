"""preprocess_data: Megatron's .idx/.bin format, determinism across workers and shards, bad input, resume."""
import gzip
import json
import os
import random
import struct

import numpy as np
import pytest

from megatron_tempnet.data import preprocess as pp
from megatron_tempnet.data.indexed import DatasetError, merge_datasets, read_json
from megatron_tempnet.data.inputs import InputError
from megatron_tempnet.data.preprocess import PreprocessConfig, preprocess
from megatron_tempnet.data.tokenizer import load_tokenizer, train_sentencepiece

WORDS = ("the of and to in is for that with on as by data model token layer tensor rank shard "
         "parallel pipeline gradient loss temperature robust sample batch def return self import").split()


def doc(rng, i):
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(rng.randint(1, 5))]
    return ("    " if i % 4 == 0 else "") + "\n".join(lines) + ("\n" if i % 2 else "")


def docs(n, seed=0):
    rng = random.Random(seed)
    return [doc(rng, i) for i in range(n)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_sentencepiece(docs(300, seed=1) + ["naïve café 日本"], str(d / "tok"), 300, threads=1)["model"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL, a .jsonl.gz and a folder of text files (with a hidden file that must be ignored)."""
    d = tmp_path_factory.mktemp("corpus")
    texts = docs(60)
    with open(d / "a.jsonl", "w") as f:
        for t in texts[:30]:
            f.write(json.dumps({"text": t, "meta": 1}) + "\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        for t in texts[30:50]:
            f.write(json.dumps({"text": t}) + "\n")
    (d / "txt" / "sub").mkdir(parents=True)
    for i, t in enumerate(texts[50:]):
        (d / "txt" / ("sub" if i % 2 else "") / f"f{i:02d}.txt").write_text(t)
    (d / "txt" / ".hidden.txt").write_text("never read")
    files_order = sorted([f"f{i:02d}.txt" if i % 2 == 0 else f"sub/f{i:02d}.txt" for i in range(10)])
    by_name = {(f"sub/f{i:02d}.txt" if i % 2 else f"f{i:02d}.txt"): t for i, t in enumerate(texts[50:])}
    expected = texts[:50] + [by_name[n] for n in files_order]
    return {"inputs": [str(d / "a.jsonl"), str(d / "b.jsonl.gz"), str(d / "txt")], "texts": expected, "dir": d}


def run(corpus_inputs, tok, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return preprocess(PreprocessConfig(inputs=corpus_inputs, output_prefix=str(out), tokenizer=tok, **kw))


def tree_bytes(folder):
    return {
        os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
        for r, _, fs in os.walk(folder) for f in fs
    }


# ---------------------------------------------------------------------------------------------- format


def test_round_trip_and_idx_bytes_follow_megatron_format(corpus, tok_path, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    man = run(corpus["inputs"], tok_path, tmp_path / "out" / "c", append_eod=True)
    tok = load_tokenizer(tok_path)
    expected = [tok.tokenize(t) + [tok.eod] for t in corpus["texts"]]
    assert man["counts"]["docs"] == len(expected) == 60
    assert man["dtype"] == "uint16" and man["tokenizer"]["vocab_size"] == 300
    assert man["tokenizer"]["sha256"] == tok.sha256 and man["complete"]
    prefix = str(tmp_path / "out" / "c_00000")

    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17])[0] == 1  # version
    assert raw[17] == 8  # megatron DType code of uint16
    n_seq, n_doc = struct.unpack("<QQ", raw[18:34])
    assert (n_seq, n_doc) == (60, 61)
    assert len(raw) == 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
    lengths = np.frombuffer(raw, np.int32, n_seq, 34)
    pointers = np.frombuffer(raw, np.int64, n_seq, 34 + 4 * n_seq)
    doc_idx = np.frombuffer(raw, np.int64, n_doc, 34 + 12 * n_seq)
    assert lengths.tolist() == [len(e) for e in expected]
    assert pointers.tolist() == (np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2).tolist()
    assert doc_idx.tolist() == list(range(61))
    tokens = np.fromfile(prefix + ".bin", dtype=np.uint16)
    assert tokens.tolist() == [t for e in expected for t in e]

    ds = IndexedDataset(prefix)  # megatron-core reads it
    assert len(ds) == 60
    for i in (0, 31, 59):
        assert ds[i].tolist() == expected[i]
    assert tok.detokenize(ds[45][:-1].tolist()) == corpus["texts"][45]

    meta = read_json(prefix + ".meta.json")
    assert meta["tokenizer"]["sha256"] == tok.sha256 and meta["counts"]["docs"] == 60


def test_same_output_for_any_worker_count(corpus, tok_path, tmp_path):
    m1 = run(corpus["inputs"], tok_path, tmp_path / "w1" / "c", workers=1, shards=3, append_eod=True)
    m4 = run(corpus["inputs"], tok_path, tmp_path / "w4" / "c", workers=4, shards=3, append_eod=True, chunk_records=4)
    assert m4["run"]["workers"] == 4
    a, b = tree_bytes(tmp_path / "w1"), tree_bytes(tmp_path / "w4")
    assert sorted(a) == sorted(b) and len(a) == 3 * 3 + 1  # 3 shards x (.bin .idx .meta.json) + manifest
    for name in a:
        assert a[name] == b[name], name  # byte-identical, manifest and markers included
    assert m1["counts"] == m4["counts"]


@pytest.mark.parametrize("sharding", [{"shards": 4}, {"docs_per_shard": 7}, {"shard_size_mb": 0.0005}])
def test_one_shard_equals_n_shards_merged(corpus, tok_path, tmp_path, sharding):
    run(corpus["inputs"], tok_path, tmp_path / "one" / "c", append_eod=True)
    man = run(corpus["inputs"], tok_path, tmp_path / "many" / "c", append_eod=True, **sharding)
    assert len(man["shards"]) > 1
    assert sum(s["datasets"]["text"]["docs"] for s in man["shards"]) == 60
    merge_datasets([str(tmp_path / "many" / "c.manifest.json")], str(tmp_path / "merged" / "all"))
    for ext in (".bin", ".idx"):
        assert open(tmp_path / "merged" / f"all{ext}", "rb").read() == open(tmp_path / "one" / f"c_00000{ext}", "rb").read()


def test_several_json_keys_get_their_own_datasets(tmp_path, tok_path):
    src = tmp_path / "k.jsonl"
    src.write_text("".join(json.dumps({"text": t, "title": t.split()[0]}) + "\n" for t in docs(10)))
    man = run([str(src)], tok_path, tmp_path / "o" / "k", json_keys=["text", "title"], shards=2)
    assert sorted(man["prefixes"]) == ["text", "title"]
    assert man["prefixes"]["title"] == ["k_title_00000", "k_title_00001"]
    assert man["counts"]["per_key"]["title"]["docs"] == 10


def test_text_mode_line_and_plain_text_inputs(tmp_path, tok_path):
    f = tmp_path / "lines.txt"
    f.write_text("first line\n\nsecond line\nthird")
    man = run([str(f)], tok_path, tmp_path / "o" / "l", text_mode="line")
    assert man["counts"]["docs"] == 3 and man["counts"]["skipped"] == {"empty": 1}
    man = run([str(f)], tok_path, tmp_path / "o2" / "l")  # default: one document per file
    assert man["counts"]["docs"] == 1


# ---------------------------------------------------------------------------------------------- bad input


BAD_LINES = [
    json.dumps({"text": "good one"}).encode(),
    b'{"text": "unterminated',  # malformed JSON
    json.dumps({"body": "no text key"}).encode(),  # missing key
    json.dumps({"text": ""}).encode(),  # empty
    json.dumps({"text": "   \n\t"}).encode(),  # whitespace only: empty
    b'{"text": "bad \xff\xfe bytes"}',  # invalid UTF-8
    b'{"text": "lone \\ud800 surrogate"}',  # valid JSON, not encodable text
    json.dumps({"text": 42}).encode(),  # not a string
    b"[1, 2, 3]",  # not an object
    b"",  # blank line
    json.dumps({"text": "good two"}).encode(),
]


def test_bad_records_are_skipped_and_counted(tmp_path, tok_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    man = run([str(src)], tok_path, tmp_path / "o" / "bad")
    assert man["counts"]["docs"] == 2 and man["counts"]["records"] == len(BAD_LINES)
    assert man["counts"]["skipped"] == {
        "blank_line": 1, "empty": 2, "invalid_utf8": 2, "malformed_json": 1,
        "missing_key": 1, "not_a_string": 1, "not_an_object": 1,
    }
    err = capsys.readouterr().err
    assert f"{src}:2: malformed_json" in err and f"{src}:3: missing_key" in err


def test_strict_stops_at_file_and_line_and_keeps_completed_shards(tmp_path, tok_path):
    texts = docs(20)
    lines = [json.dumps({"text": t}) for t in texts]
    lines[12] = '{"text": broken'
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o" / "s"
    with pytest.raises(InputError, match=rf"{src}:13: malformed json .*--strict"):
        run([str(src)], tok_path, out, strict=True, docs_per_shard=5)
    names = sorted(os.listdir(tmp_path / "o"))
    assert names == ["s.manifest.json", "s_00000.bin", "s_00000.idx", "s_00000.meta.json",
                     "s_00001.bin", "s_00001.idx", "s_00001.meta.json"]  # no half shard, no .tmp left
    man = read_json(str(out) + ".manifest.json")
    assert not man["complete"] and len(man["shards"]) == 2 and man["counts"]["docs"] == 10
    # a rerun without --strict resumes after the completed shards and equals a fresh run
    man = run([str(src)], tok_path, out, docs_per_shard=5)
    assert man["run"]["resumed_shards"] == 2 and man["complete"] and man["counts"]["docs"] == 19
    run([str(src)], tok_path, tmp_path / "fresh" / "s", docs_per_shard=5)
    assert tree_bytes(tmp_path / "o") == tree_bytes(tmp_path / "fresh")


def test_crash_mid_shard_leaves_no_complete_looking_shard_and_rerun_resumes(tmp_path, tok_path, corpus, monkeypatch):
    out = tmp_path / "o" / "c"
    original = pp.Shard.finish

    def crash_on_second(self, end, meta):
        if self.index == 1:
            raise RuntimeError("simulated crash")
        return original(self, end, meta)

    monkeypatch.setattr(pp.Shard, "finish", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        run(corpus["inputs"], tok_path, out, shards=3)
    names = sorted(os.listdir(tmp_path / "o"))
    assert not any(n.startswith("c_00001") or n.endswith(".tmp") for n in names), names
    assert "c_00000.idx" in names and "c_00000.meta.json" in names
    monkeypatch.setattr(pp.Shard, "finish", original)
    before = os.stat(str(out) + "_00000.bin").st_mtime_ns
    man = run(corpus["inputs"], tok_path, out, shards=3)
    assert man["run"]["resumed_shards"] == 1 and os.stat(str(out) + "_00000.bin").st_mtime_ns == before
    run(corpus["inputs"], tok_path, tmp_path / "fresh" / "c", shards=3)
    assert tree_bytes(tmp_path / "o") == tree_bytes(tmp_path / "fresh")


def test_rerun_skips_verified_shards_and_redoes_a_corrupted_one(tmp_path, tok_path, corpus):
    out = tmp_path / "o" / "c"
    run(corpus["inputs"], tok_path, out, shards=3)
    good = tree_bytes(tmp_path / "o")
    man = run(corpus["inputs"], tok_path, out, shards=3)
    assert man["run"]["resumed_shards"] == 3 and tree_bytes(tmp_path / "o") == good
    # shard 2 starts inside the .gz file: resuming there seeks into the decompressed stream
    assert man["shards"][2]["records"] == [40, 60]
    with open(str(out) + "_00002.bin", "r+b") as f:  # same size, different bytes: only the checksum sees it
        f.write(b"\x00\x00")
    man = run(corpus["inputs"], tok_path, out, shards=3)
    assert man["run"]["resumed_shards"] == 2 and tree_bytes(tmp_path / "o") == good
    man = run(corpus["inputs"], tok_path, out, shards=3, force=True)
    assert man["run"]["resumed_shards"] == 0 and tree_bytes(tmp_path / "o") == good
    # different settings (another sharding) never reuse the old shards, and leave none of them behind
    man = run(corpus["inputs"], tok_path, out, shards=2)
    assert man["run"]["resumed_shards"] == 0
    assert sorted(n for n in os.listdir(tmp_path / "o") if n.endswith(".bin")) == ["c_00000.bin", "c_00001.bin"]


def test_vocabulary_too_large_for_uint16(tmp_path):
    from test_data_tokenizer import make_hf_tokenizer

    folder = make_hf_tokenizer(tmp_path / "hf", 70000)
    src = tmp_path / "w.jsonl"
    src.write_text(json.dumps({"text": "the w69000 data w5"}) + "\n")
    with pytest.raises(DatasetError, match=r"70000 ids .* does not fit uint16.*--dtype int32"):
        run([str(src)], folder, tmp_path / "o" / "w", dtype="uint16")
    assert not (tmp_path / "o" / "w_00000.bin").exists()
    man = run([str(src)], folder, tmp_path / "o" / "w", append_eod=True)  # auto: int32
    assert man["dtype"] == "int32"
    raw = open(tmp_path / "o" / "w_00000.idx", "rb").read()
    assert raw[17] == 4  # megatron DType code of int32
    tok = load_tokenizer(folder)
    ids = np.fromfile(tmp_path / "o" / "w_00000.bin", dtype=np.int32).tolist()
    assert ids == tok.tokenize("the w69000 data w5") + [tok.eod] and max(ids) > 65535


def test_missing_inputs_and_bad_options(tmp_path, tok_path):
    with pytest.raises(InputError, match="does not exist"):
        run([str(tmp_path / "nope.jsonl")], tok_path, tmp_path / "o" / "x")
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(InputError, match="at most one"):
        run([str(src)], tok_path, tmp_path / "o" / "x", shards=2, shard_size_mb=1)


# ---------------------------------------------------------------------------------------------- backends


def without_encoding(manifest_bytes):
    man = json.loads(manifest_bytes)
    man.pop("encoding")
    return man


def assert_same_output(a, b):
    """Every .bin/.idx/.meta.json byte-identical; the manifests equal but for the backend they name."""
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        if name.endswith(".manifest.json"):
            assert without_encoding(ta[name]) == without_encoding(tb[name]), name
        else:
            assert ta[name] == tb[name], name


@pytest.fixture(scope="module")
def special_corpus(tmp_path_factory, corpus):
    """The corpus plus documents that spell the tokenizer's control pieces and unusual text."""
    d = tmp_path_factory.mktemp("special")
    extra = ["a <s> b </s> c <pad> <unk>", "tabs\tand\r\nwindows lines", "naïve café 日本 🙂", " leading", "x" * 3000]
    with open(d / "s.jsonl", "w") as f:
        for t in extra:
            f.write(json.dumps({"text": t}) + "\n")
    return corpus["inputs"] + [str(d / "s.jsonl")]


def backends_available():
    out = ["sentencepiece"]
    try:
        import gigatoken  # noqa: F401

        out.append("gigatoken")
    except ImportError:
        pass
    return out


def test_same_output_for_every_backend_and_worker_count(special_corpus, tok_path, tmp_path):
    tok = load_tokenizer(tok_path)
    ref = None
    for backend in backends_available():
        for workers in (1, 2, 4):
            out = tmp_path / f"{backend}_{workers}"
            man = run(special_corpus, tok_path, out / "c", workers=workers, shards=3, append_eod=True,
                      tokenizer_backend=backend, chunk_bytes=1500 * workers)
            assert man["encoding"]["backend"] == backend and man["run"]["tokenizer_backend"] == backend
            assert man["encoding"]["version"] not in ("", "unknown")
            if ref is None:
                ref = out
                from megatron.core.datasets.indexed_dataset import IndexedDataset

                texts = [json.loads(line)["text"] for line in open(special_corpus[-1])]
                ds = IndexedDataset(str(out / "c_00002"))
                assert [ds[len(ds) - 5 + i].tolist() for i in range(5)] == [tok.tokenize(t) + [tok.eod] for t in texts]
            else:
                assert_same_output(ref, out)


def test_a_backend_that_disagrees_is_refused_before_writing(corpus, tok_path, tmp_path, monkeypatch):
    pytest.importorskip("gigatoken")
    from megatron_tempnet.data import encoders

    original = encoders.GigatokenEncoder.encode

    def off_by_one(self, texts):
        tokens, lengths = original(self, texts)
        tokens = tokens.copy()
        if len(texts) > 3:
            tokens[int(lengths[:3].sum()) + 1] += 1  # document 3, token 1
        return tokens, lengths

    monkeypatch.setattr(encoders.GigatokenEncoder, "encode", off_by_one)
    with pytest.raises(encoders.BackendError, match=r"gigatoken .* other ids than sentencepiece .*a\.jsonl:4 \(token 1.*--tokenizer-backend sentencepiece"):
        run(corpus["inputs"], tok_path, tmp_path / "o" / "c", tokenizer_backend="gigatoken")
    assert not [n for n in os.listdir(tmp_path / "o") if n.endswith((".bin", ".idx"))]


def test_a_backend_that_raises_leaves_the_batch_to_the_reference(corpus, tok_path, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gigatoken")
    from megatron_tempnet.data import encoders

    def fail(self, texts):
        raise RuntimeError("boom")

    monkeypatch.setattr(encoders.GigatokenEncoder, "encode", fail)
    run(corpus["inputs"], tok_path, tmp_path / "g" / "c", tokenizer_backend="gigatoken", append_eod=True)
    assert "gigatoken failed on a batch (RuntimeError: boom); encoded it with sentencepiece" in capsys.readouterr().err
    run(corpus["inputs"], tok_path, tmp_path / "s" / "c", tokenizer_backend="sentencepiece", append_eod=True)
    assert_same_output(tmp_path / "g", tmp_path / "s")


def test_a_model_gigatoken_cannot_read_falls_back_with_one_line(corpus, tmp_path, capsys):
    pytest.importorskip("gigatoken")
    unigram = train_sentencepiece(docs(300, seed=1), str(tmp_path / "uni"), 300, model_type="unigram", threads=1)["model"]
    capsys.readouterr()
    man = run(corpus["inputs"], unigram, tmp_path / "o" / "c", tokenizer_backend="gigatoken")
    lines = [x for x in capsys.readouterr().err.splitlines() if "gigatoken" in x]
    assert len(lines) == 1 and "cannot read this model" in lines[0] and "using sentencepiece" in lines[0], lines
    assert man["encoding"]["backend"] == "sentencepiece" and man["counts"]["docs"] == 60


def test_backend_that_does_not_fit_the_tokenizer_is_a_clear_error(corpus, tok_path, tmp_path):
    from megatron_tempnet.data.encoders import BackendError

    with pytest.raises(BackendError, match=r"--tokenizer-backend hf cannot run .*sentencepiece .model.*use sentencepiece, gigatoken or auto"):
        run(corpus["inputs"], tok_path, tmp_path / "o" / "c", tokenizer_backend="hf")
    assert not (tmp_path / "o" / "c_00000.bin").exists()


def test_byte_level_bpe_folder_for_every_backend(special_corpus, tmp_path):
    pytest.importorskip("transformers")
    from megatron_tempnet.data.bpe_training import train_byte_level_bpe

    folder = train_byte_level_bpe(docs(300, seed=1) + ["naïve café 日本"], str(tmp_path / "bpe"), 400, threads=1)["model"]
    tok = load_tokenizer(folder)
    assert tok.kind == "huggingface" and tok.eod == 2
    backends = ["hf"] + [b for b in backends_available() if b == "gigatoken"]
    for backend in backends:
        man = run(special_corpus, folder, tmp_path / backend / "c", workers=2, append_eod=True,
                  tokenizer_backend=backend, chunk_bytes=2000)
        assert man["encoding"]["backend"] == backend
    assert_same_output(tmp_path / "hf", tmp_path / backends[-1])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "hf" / "c_00000"))
    text = json.loads(open(special_corpus[-1]).readline())["text"]
    assert ds[len(ds) - 5].tolist() == tok.tokenize(text) + [tok.eod]


def test_index_writer_matches_megatron_builder_byte_for_byte(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_tempnet.data.writer import TokenFileWriter

    rng = np.random.default_rng(0)
    for n_docs in (0, 1, 7):
        lengths = rng.integers(1, 50, n_docs)
        tokens = rng.integers(0, 60000, int(lengths.sum())).astype(np.uint16)
        b = IndexedDatasetBuilder(str(tmp_path / f"m{n_docs}.bin"), dtype=np.uint16)
        for d in np.split(tokens, np.cumsum(lengths)[:-1]) if n_docs else []:
            b.add_document(d, [d.size])
        b.finalize(str(tmp_path / f"m{n_docs}.idx"))
        w = TokenFileWriter(str(tmp_path / f"o{n_docs}"), np.uint16)
        cut = int(lengths[:2].sum()) if n_docs > 2 else 0
        w.add(tokens[:cut], lengths[: 2 if n_docs > 2 else 0])
        w.add(tokens[cut:], lengths[2 if n_docs > 2 else 0 :])
        files = w.finish()
        for ext in ("bin", "idx"):
            mine = open(tmp_path / f"o{n_docs}.{ext}.tmp", "rb").read()
            assert mine == open(tmp_path / f"m{n_docs}.{ext}", "rb").read(), (n_docs, ext)
            assert files[ext]["sha256"] == ix_sha(mine) and files[ext]["bytes"] == len(mine)
        assert not (tmp_path / f"o{n_docs}.lengths.tmp").exists()


def ix_sha(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_fast_json_path_agrees_with_parse_record():
    from megatron_tempnet.data.inputs import RecordBatch, SkipRecord, parse_batch, parse_record

    lines = BAD_LINES + [b'\xef\xbb\xbf{"text": "bom"}', b'{"text": NaN, "x": 1}', b'{"text": "x", "n": 123456789012345678901234567890}',
                         b'{"text": "dup", "text": "last"}', b'{"text": "tab\\there \\u00e9 \\ud83d\\ude00"}', b'{"text": "a"}\r',
                         b'{"text": "\\u0000"}', b'  {"text": "spaced"}  ', b'[' * 5000 + b']' * 5000]
    z = np.zeros(len(lines), np.int64)
    batch = RecordBatch(0, lines, z, z + 1, z, z, z, 0)
    texts, recs, skips = parse_batch(batch, ["text"], [True])
    expected_texts, expected_skips = [], []
    for j, raw in enumerate(lines):
        try:
            t = parse_record(raw, True, ["text"])["text"]
        except SkipRecord as s:
            expected_skips.append((j, None, s.reason, s.detail))
            continue
        if isinstance(t, SkipRecord):
            expected_skips.append((j, "text", t.reason, t.detail))
        else:
            expected_texts.append((j, t))
    assert list(zip(recs["text"].tolist(), texts["text"])) == expected_texts
    assert skips == expected_skips
    assert ("dup" not in texts["text"]) and "last" in texts["text"] and "bom" not in texts["text"]
