"""The data CLIs (tools/*.py): user errors exit 1 with one clear line and no traceback; the stdlib corpus."""
import json
import os
import subprocess
import sys

import pytest

from megatron_tempnet.data.corpus import is_heldout, stdlib_root, stdlib_source_files, write_stdlib_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def tool(name, *args):
    """Run tools/<name>'s main() in this process, through the same error handling as the script."""
    import contextlib
    import importlib.util
    import io

    from megatron_tempnet.cli import run

    spec = importlib.util.spec_from_file_location(f"tool_{name[:-3]}", os.path.join(REPO, "tools", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run(mod.main, [str(a) for a in args])
    return Result(rc, out.getvalue(), err.getvalue())


def script(name, *args):
    """Run tools/<name> as its own process."""
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def assert_user_error(r, *needles):
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small stdlib corpus and a tokenizer trained on it through the CLIs."""
    d = tmp_path_factory.mktemp("tools")
    r = tool("build_stdlib_corpus.py", "--output", d / "std.jsonl", "--max-files", 25)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["train_docs"] > 0
    r = tool("train_tokenizer.py", "--input", d / "std.jsonl", "--model-prefix", d / "tok", "--vocab-size", 400, "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vocab_size"] == 400
    return d


def test_preprocess_strict_merge_inspect(tiny):
    d = tiny
    bad = d / "bad.jsonl"
    good = open(d / "std.jsonl").read().splitlines()[:6]
    bad.write_text("\n".join(good[:3] + ['{"text": "unterminated'] + good[3:]) + "\n")
    r = script("preprocess_data.py", "--input", bad, "--tokenizer-model", d / "tok.model", "--output-prefix", d / "o" / "b",
               "--strict", "--quiet", "--docs-per-shard", 2, "--workers", 2)
    assert_user_error(r, f"{bad}:4: malformed json", "--strict")
    assert sorted(os.listdir(d / "o"))[:3] == ["b.manifest.json", "b_00000.bin", "b_00000.idx"]  # shard 0 kept
    r = tool("preprocess_data.py", "--input", bad, "--tokenizer-model", d / "tok.model", "--output-prefix", d / "o" / "b",
             "--quiet", "--docs-per-shard", 2, "--append-eod")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["docs"] == 6 and out["skipped"] == {"malformed_json": 1} and out["shards"] == 4
    assert {"docs_per_s", "mb_per_s", "tokens_per_s", "peak_rss_self_mb"} <= set(out)
    r = tool("merge_datasets.py", "--input", d / "o" / "b.manifest.json", "--output-prefix", d / "m" / "all")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["documents"] == 6
    r = tool("inspect_dataset.py", "--prefix", d / "m" / "all", "--doc", 1, "--max-chars", 200)
    assert r.returncode == 0, r.stderr
    assert "6 documents" in r.stdout and "histogram" in r.stdout
    first = json.loads(good[1])["text"]
    assert first[:100] in r.stdout  # document 1 decoded with the recorded tokenizer


def test_cli_user_errors(tiny, tmp_path):
    d = tiny
    # vocabulary too large for the forced dtype (checked before anything is written)
    from test_data_tokenizer import make_hf_tokenizer

    hf = make_hf_tokenizer(tmp_path / "hf", 70000)
    r = tool("preprocess_data.py", "--input", d / "std.jsonl", "--tokenizer-model", hf, "--output-prefix", tmp_path / "x",
             "--dtype", "uint16", "--quiet")
    assert_user_error(r, "70000", "uint16", "--dtype int32")
    r = tool("preprocess_data.py", "--input", tmp_path / "missing.jsonl", "--tokenizer-model", d / "tok.model",
             "--output-prefix", tmp_path / "x")
    assert_user_error(r, "missing.jsonl does not exist")
    # an .idx without its .bin, and a truncated .bin
    r = tool("preprocess_data.py", "--input", d / "std.jsonl", "--tokenizer-model", d / "tok.model",
             "--output-prefix", tmp_path / "p", "--quiet", "--workers", 1)
    assert r.returncode == 0, r.stderr
    prefix = str(tmp_path / "p_00000")
    os.rename(prefix + ".bin", prefix + ".bin.moved")
    assert_user_error(tool("inspect_dataset.py", "--prefix", prefix), "p_00000.bin is missing")
    with open(prefix + ".bin.moved", "r+b") as f:
        f.truncate(1000)
    os.rename(prefix + ".bin.moved", prefix + ".bin")
    assert_user_error(tool("merge_datasets.py", "--input", prefix, "--output-prefix", tmp_path / "m"), "truncated")
    assert_user_error(tool("train_tokenizer.py", "--input", d / "std.jsonl", "--model-prefix", tmp_path / "t",
                           "--vocab-size", 50), "too small")


def test_stdlib_corpus_is_deterministic_and_filtered(tmp_path):
    files = stdlib_source_files()
    rel = [p.relative_to(stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert not any("site-packages" in r or "/test/" in f"/{r}" or r.split("/")[-1].startswith("test_") for r in rel)
    assert len(stdlib_source_files(include_tests=True)) > len(files)
    a = write_stdlib_corpus(str(tmp_path / "a.jsonl"), holdout_output=str(tmp_path / "ah.jsonl"),
                            holdout_fraction=0.2, max_files=60)
    write_stdlib_corpus(str(tmp_path / "b.jsonl"), holdout_output=str(tmp_path / "bh.jsonl"),
                            holdout_fraction=0.2, max_files=60)
    assert open(tmp_path / "a.jsonl", "rb").read() == open(tmp_path / "b.jsonl", "rb").read()
    assert a["heldout_docs"] > 0 and a["train_docs"] > a["heldout_docs"]
    train = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    held = [json.loads(line) for line in open(tmp_path / "ah.jsonl")]
    assert not {d["path"] for d in train} & {d["path"] for d in held}
    assert all(is_heldout(d["path"], 0.2) for d in held)
    assert train[0]["text"] == (stdlib_root() / train[0]["path"]).read_text(encoding="utf-8")


def test_stdlib_corpus_on_a_custom_tree(tmp_path):
    root = tmp_path / "lib"
    for rel in ["b.py", "a.py", "pkg/c.py", "pkg/tests/t.py", "site-packages/x.py", "test_mod.py", "__pycache__/z.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    (root / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = '\xe9'\n")
    out = write_stdlib_corpus(str(tmp_path / "c.jsonl"), root=root)
    got = [json.loads(line) for line in open(tmp_path / "c.jsonl")]
    assert [d["path"] for d in got] == ["a.py", "b.py", "latin.py", "pkg/c.py"] and out["files"] == 4
    assert "name = 'é'" in got[2]["text"]  # decoded with its PEP 263 declaration


def test_byte_bpe_tokenizer_through_the_clis(tiny, tmp_path):
    pytest.importorskip("transformers")
    d = tiny
    r = tool("train_tokenizer.py", "--input", d / "std.jsonl", "--model-prefix", tmp_path / "bpe", "--vocab-size", 500,
             "--model-type", "byte-bpe", "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["vocab_size"] <= 500 and (tmp_path / "bpe" / "tokenizer.json").is_file()
    outs = {}
    for backend in ("hf", "auto"):
        r = tool("preprocess_data.py", "--input", d / "std.jsonl", "--tokenizer-model", tmp_path / "bpe" / "tokenizer.json",
                 "--output-prefix", tmp_path / backend / "c", "--quiet", "--append-eod", "--workers", 2,
                 "--tokenizer-backend", backend)
        assert r.returncode == 0, r.stderr
        outs[backend] = json.loads(r.stdout.strip().splitlines()[-1])
        assert outs[backend]["tokenizer_backend"] == ("hf" if backend == "hf" else "gigatoken")
    assert (tmp_path / "hf" / "c_00000.bin").read_bytes() == (tmp_path / "auto" / "c_00000.bin").read_bytes()
    r = tool("inspect_dataset.py", "--prefix", tmp_path / "hf" / "c_00000", "--doc", 0, "--max-chars", 200)
    assert r.returncode == 0, r.stderr
    first = json.loads(open(d / "std.jsonl").readline())["text"]
    assert first[:100] in r.stdout  # decoded with the recorded tokenizer


def test_backend_errors_are_one_clear_line(tiny, tmp_path):
    d = tiny
    r = tool("preprocess_data.py", "--input", d / "std.jsonl", "--tokenizer-model", d / "tok.model",
             "--output-prefix", tmp_path / "x", "--tokenizer-backend", "hf")
    assert_user_error(r, "--tokenizer-backend hf cannot run", "use sentencepiece, gigatoken or auto")
    assert not list(tmp_path.iterdir())
