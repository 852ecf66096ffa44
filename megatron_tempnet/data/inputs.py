"""Reading raw corpora: JSONL (plain or .gz) and plain text files, or folders of them, streamed.

A corpus is an ordered list of input files. Folders are expanded recursively in sorted order, so the
same folder always gives the same order. Each file is a sequence of *records*:

  JSONL (.jsonl .json .ndjson, optionally .gz): one record per line (every line counts, blank ones
      included, so record numbers equal line numbers and can be counted without parsing).
  plain text (any other name, optionally .gz): text_mode "file" (default): the whole file is one record;
      text_mode "line": one record per line.

Records stay raw bytes here; parse_record() turns one into the texts of the requested keys, or raises
SkipRecord with a reason. Parsing happens in preprocess_data's worker processes, not in the reader.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_MODES = ("file", "line")

# Skip reasons. STRICT_REASONS stop a --strict run; the others are ordinary, counted skips.
SKIP_REASONS = (
    "malformed_json",
    "invalid_utf8",
    "not_an_object",
    "missing_key",
    "not_a_string",
    "empty",
    "blank_line",
)
STRICT_REASONS = frozenset({"malformed_json", "invalid_utf8", "not_an_object", "missing_key", "not_a_string"})


class InputError(ValueError):
    """Unusable input (missing file, bad record under --strict). The message names the problem and the fix."""


class SkipRecord(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def is_jsonl(path: str) -> bool:
    return _strip_gz(path.lower()).endswith(JSONL_SUFFIXES)


def _skip_in_folder(p: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in p.parts)


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Files in a deterministic order: each argument in the order given; a folder's files sorted by
    relative path (hidden files, hidden folders and __pycache__ are left out)."""
    out: List[str] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = sorted(
                (f for f in p.rglob("*") if f.is_file() and not _skip_in_folder(f.relative_to(p))),
                key=lambda f: f.relative_to(p).as_posix(),
            )
            if not found:
                raise InputError(f"input folder {arg} has no files")
            out.extend(str(f) for f in found)
        elif p.is_file():
            out.append(str(p))
        else:
            raise InputError(f"input {arg} does not exist; pass JSONL / text files or folders of them")
    if not out:
        raise InputError("no input files given (--input)")
    return out


def open_binary(path: str):
    """A binary, seekable-forward reader; .gz files are decompressed on the fly."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def count_records(path: str, text_mode: str = "file") -> int:
    """Number of records in a file, without parsing (lines for JSONL and line mode; 1 for a text file)."""
    if not is_jsonl(path) and text_mode == "file":
        return 1
    n = 0
    last = b"\n"
    with open_binary(path) as f:
        while True:
            block = f.read(1 << 22)
            if not block:
                break
            n += block.count(b"\n")
            last = block[-1:]
    if last != b"\n":
        n += 1  # a final line without a newline
    return n


@dataclass(frozen=True)
class Position:
    """Where reading resumes: the running record index and the place in the input files."""

    record: int = 0  # running record index over all inputs (the basis of shard assignment)
    file: int = 0  # index into the input file list
    offset: int = 0  # byte offset in that file (decompressed bytes for .gz)
    line: int = 0  # number of lines of that file before offset

    def to_json(self) -> dict:
        return {"record": self.record, "file": self.file, "offset": self.offset, "line": self.line}

    @staticmethod
    def from_json(d: dict) -> "Position":
        return Position(int(d["record"]), int(d["file"]), int(d["offset"]), int(d["line"]))


@dataclass
class RawRecord:
    index: int  # running record index
    file: int  # input file index
    line: int  # 1-based line number (0 for a whole-file record)
    raw: bytes
    end: Position  # the position just after this record
    nbytes: int  # bytes consumed from the input (for progress)


def iter_records(files: Sequence[str], text_mode: str = "file", start: Position = Position()) -> Iterator[RawRecord]:
    """Stream raw records from `start` on. Memory: one line (or one whole text file in "file" mode)."""
    if text_mode not in TEXT_MODES:
        raise InputError(f"unknown text mode {text_mode!r}; use one of {TEXT_MODES}")
    index = start.record
    for fi in range(start.file, len(files)):
        path = files[fi]
        offset = start.offset if fi == start.file else 0
        line = start.line if fi == start.file else 0
        by_line = is_jsonl(path) or text_mode == "line"
        with open_binary(path) as f:
            if offset:
                f.seek(offset)
            if not by_line:
                raw = f.read()
                offset += len(raw)
                yield RawRecord(index, fi, 0, raw, Position(index + 1, fi + 1, 0, 0), len(raw))
                index += 1
                continue
            for raw in f:
                line += 1
                offset += len(raw)
                yield RawRecord(index, fi, line, raw, Position(index + 1, fi, offset, line), len(raw))
                index += 1


def parse_record(raw: bytes, jsonl: bool, keys: Sequence[str]) -> Dict[str, Optional[str]]:
    """The text of each key (None where the key is missing / not a string / empty: see the second value).

    Returns {key: text}. Raises SkipRecord for a record that yields nothing at all (bad JSON, bad UTF-8,
    not an object). Per-key problems come back as SkipRecord instances in place of the text.
    """
    if jsonl:
        body = raw.rstrip(b"\r\n")
        if not body.strip():
            raise SkipRecord("blank_line")
        try:
            s = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipRecord("invalid_utf8", f"byte {e.start}: {e.reason}") from None
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise SkipRecord("malformed_json", f"{e.msg} at column {e.colno}") from None
        except RecursionError:
            raise SkipRecord("malformed_json", "nested too deeply") from None
        if not isinstance(obj, dict):
            raise SkipRecord("not_an_object", f"a JSON {type(obj).__name__}, not an object")
        out = {}
        for k in keys:
            v = obj.get(k)
            if v is None:
                out[k] = SkipRecord("missing_key", f"no key {k!r} (keys: {', '.join(list(obj)[:8])})")
            elif not isinstance(v, str):
                out[k] = SkipRecord("not_a_string", f"{k!r} is a JSON {type(v).__name__}")
            else:
                out[k] = _check_text(v)
        return out
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipRecord("invalid_utf8", f"byte {e.start}: {e.reason}") from None
    return {k: _check_text(s) for k in keys}


def _check_text(s: str):
    if not s.strip():
        return SkipRecord("empty")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from JSON escapes such as "\ud800"
        return SkipRecord("invalid_utf8", f"character {e.start}: {e.reason}")
    return s


def iter_texts(paths: Sequence[str], keys: Sequence[str] = ("text",), text_mode: str = "file") -> Iterator[str]:
    """Every usable text of the given keys, in order; bad records are silently passed over.
    (For tokenizer training; preprocess_data counts and reports its skips instead.)"""
    files = expand_inputs(paths)
    for rec in iter_records(files, text_mode):
        try:
            texts = parse_record(rec.raw, is_jsonl(files[rec.file]), keys)
        except SkipRecord:
            continue
        for k in keys:
            t = texts[k]
            if isinstance(t, str):
                yield t


def input_fingerprint(files: Sequence[str]) -> List[dict]:
    """Path and size of each input (recorded in the manifest; part of the resume fingerprint)."""
    return [{"path": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files]
