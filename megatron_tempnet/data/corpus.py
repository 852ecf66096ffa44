"""The embedded default corpus: the Python standard library's own .py source files.

Every machine with Python has it, so the quickstart needs no download. The file list is deterministic:
the stdlib folder from sysconfig.get_paths()["stdlib"], .py files sorted by relative path, leaving out
site-packages / dist-packages, __pycache__, hidden folders and (by default) test folders
(test, tests, idle_test) and test_*.py files. Each file becomes one JSONL document
{"text": <source>, "path": <path relative to the stdlib folder>}; sources are decoded with their
PEP 263 encoding declaration.

Hold-out: `holdout_fraction` sends a file to the held-out JSONL when a hash of its relative path falls
below the fraction, so the split is stable across machines and Python patch releases (a file keeps its
side when others are added or removed).

    write_stdlib_corpus("data/stdlib.jsonl", holdout_output="data/stdlib_heldout.jsonl", holdout_fraction=0.02)
    prepare_stdlib_dataset("data/stdlib")   # corpus + tokenizer + indexed dataset, reused when present
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sysconfig
import tokenize
from pathlib import Path
from typing import Dict, List, Optional

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_test_path(rel: Path) -> bool:
    return any(p in TEST_DIRS for p in rel.parts[:-1]) or rel.name.startswith("test_")


def stdlib_source_files(root: Optional[str | os.PathLike] = None, include_tests: bool = False) -> List[Path]:
    """The stdlib's .py files, sorted by relative path (deterministic)."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library folder {root} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune while walking: site-packages can be far larger than the stdlib itself
        dirnames[:] = [
            d for d in dirnames
            if d not in EXCLUDED_DIRS and not d.startswith(".") and (include_tests or d not in TEST_DIRS)
        ]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            p = Path(dirpath) / name
            if not include_tests and is_test_path(p.relative_to(root)):
                continue
            if p.is_file():
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def read_source(path: Path) -> Optional[str]:
    """The file's text, decoded per its encoding declaration (PEP 263); None if it cannot be decoded."""
    data = path.read_bytes()
    try:
        enc, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(enc)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def is_heldout(rel_path: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def _atomic_writer(path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path + ".tmp", "w", encoding="utf-8")


def write_stdlib_corpus(
    output: str,
    *,
    holdout_output: Optional[str] = None,
    holdout_fraction: float = 0.0,
    include_tests: bool = False,
    root: Optional[str | os.PathLike] = None,
    max_files: Optional[int] = None,
) -> Dict[str, object]:
    """Write the stdlib sources as JSONL to `output` (and the held-out ones to `holdout_output`)."""
    if holdout_fraction and not holdout_output:
        raise ValueError("holdout_fraction needs holdout_output (where the held-out documents go)")
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1) (got {holdout_fraction})")
    root_p = Path(root) if root is not None else stdlib_root()
    files = stdlib_source_files(root_p, include_tests)
    if max_files is not None:
        files = files[:max_files]
    counts = {"files": len(files), "train_docs": 0, "heldout_docs": 0, "train_bytes": 0, "heldout_bytes": 0, "undecodable": 0, "empty": 0}
    writers = {"train": _atomic_writer(output)}
    if holdout_output:
        writers["heldout"] = _atomic_writer(holdout_output)
    try:
        for p in files:
            rel = p.relative_to(root_p).as_posix()
            text = read_source(p)
            if text is None:
                counts["undecodable"] += 1
                continue
            if not text.strip():
                counts["empty"] += 1
                continue
            side = "heldout" if holdout_output and is_heldout(rel, holdout_fraction) else "train"
            line = json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n"
            writers[side].write(line)
            counts[f"{side}_docs"] += 1
            counts[f"{side}_bytes"] += len(line.encode("utf-8"))
    finally:
        for w in writers.values():
            w.close()
    os.replace(output + ".tmp", output)
    if holdout_output:
        os.replace(holdout_output + ".tmp", holdout_output)
    return {"root": str(root_p), "output": output, "holdout_output": holdout_output, **counts}


def prepare_stdlib_dataset(
    out_dir: str,
    *,
    vocab_size: int = 4096,
    holdout_fraction: float = 0.0,
    include_tests: bool = False,
    workers: int = 0,
    progress: bool = False,
) -> Dict[str, object]:
    """Corpus -> sentencepiece tokenizer -> indexed dataset, under out_dir; reused when already complete.

    Returns {"tokenizer": <.model path>, "data_path": [shard prefixes], "manifest": path, ...}: pass
    data_path and the tokenizer to build_gpt_datasets (or --data-path / --tokenizer-model).
    """
    from megatron_tempnet.data.inputs import iter_texts
    from megatron_tempnet.data.preprocess import PreprocessConfig, preprocess
    from megatron_tempnet.data.tokenizer import train_sentencepiece

    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "stdlib.jsonl")
    heldout = os.path.join(out_dir, "stdlib_heldout.jsonl") if holdout_fraction > 0 else None
    tok_prefix = os.path.join(out_dir, f"tokenizer_{vocab_size}")
    data_prefix = os.path.join(out_dir, "stdlib")
    manifest = data_prefix + ".manifest.json"
    if not os.path.isfile(corpus) or (heldout and not os.path.isfile(heldout)):
        write_stdlib_corpus(corpus, holdout_output=heldout, holdout_fraction=holdout_fraction, include_tests=include_tests)
    if not os.path.isfile(tok_prefix + ".model"):
        train_sentencepiece(iter_texts([corpus]), tok_prefix, vocab_size)
    man = preprocess(
        PreprocessConfig(
            inputs=[corpus], output_prefix=data_prefix, tokenizer=tok_prefix + ".model", append_eod=True,
            workers=workers, progress=progress,
        )
    )
    out = {
        "tokenizer": tok_prefix + ".model",
        "manifest": manifest,
        "data_path": [os.path.join(out_dir, p) for p in man["prefixes"]["text"]],
        "vocab_size": man["tokenizer"]["vocab_size"],
        "docs": man["counts"]["docs"],
        "tokens": man["counts"]["tokens"],
    }
    if heldout:
        hman = preprocess(
            PreprocessConfig(
                inputs=[heldout], output_prefix=os.path.join(out_dir, "stdlib_heldout"),
                tokenizer=tok_prefix + ".model", append_eod=True, workers=workers, progress=progress,
            )
        )
        out["heldout_data_path"] = [os.path.join(out_dir, p) for p in hman["prefixes"]["text"]]
    return out
