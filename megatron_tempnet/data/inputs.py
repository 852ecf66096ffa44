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
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import orjson

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
_BOM = b"\xef\xbb\xbf"  # json.loads refuses it, so the fast path must too
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
class RecordBatch:
    """Consecutive records, possibly from several files, with where each one ends (numpy arrays, (n,))."""

    first: int  # running record index of raws[0]
    raws: List[bytes]
    file: np.ndarray  # int64 input file index of each record
    line: np.ndarray  # int64 1-based line number (0 for a whole-file record)
    end_file: np.ndarray  # int64 the Position just after each record: file, offset, line
    end_offset: np.ndarray
    end_line: np.ndarray
    nbytes: int  # input bytes the batch covers (for progress)

    def __len__(self) -> int:
        return len(self.raws)

    def end(self, j: int) -> Position:
        """The position just after record j."""
        return Position(self.first + j + 1, int(self.end_file[j]), int(self.end_offset[j]), int(self.end_line[j]))

    def where(self, files: Sequence[str], j: int) -> str:
        """file:line of record j, for messages (the file alone for a whole-file record)."""
        line = int(self.line[j])
        return f"{files[int(self.file[j])]}:{line}" if line else files[int(self.file[j])]


def _split_lines(block: bytes) -> List[bytes]:
    lines = block.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the block ends with a newline
    return lines


class _BatchBuilder:
    def __init__(self, first: int):
        self.first, self.raws, self.parts, self.nbytes = first, [], [], 0

    def add_lines(self, fi: int, lines: List[bytes], offset: int, line0: int, ends_with_newline: bool, jsonl: bool) -> int:
        """Append a file's lines (without their newlines) that start at `offset`, after line0 lines;
        returns the offset after them. Plain-text lines keep their newline: it is part of the document."""
        sizes = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)) + 1
        if not ends_with_newline:
            sizes[-1] -= 1
        if not jsonl:
            lines = [x + b"\n" for x in lines[:-1]] + [lines[-1] + b"\n" if ends_with_newline else lines[-1]]
        ends = offset + np.cumsum(sizes)
        numbers = line0 + np.arange(1, len(lines) + 1, dtype=np.int64)
        self.raws.extend(lines)
        self.parts.append((np.full(len(lines), fi, np.int64), numbers, np.full(len(lines), fi, np.int64), ends, numbers))
        self.nbytes += int(sizes.sum())
        return int(ends[-1])

    def add_file(self, fi: int, raw: bytes) -> None:
        one = lambda v: np.array([v], np.int64)  # noqa: E731
        self.raws.append(raw)
        self.parts.append((one(fi), one(0), one(fi + 1), one(0), one(0)))
        self.nbytes += len(raw)

    def take(self) -> "RecordBatch":
        cols = [np.concatenate([p[i] for p in self.parts]) for i in range(5)]
        batch = RecordBatch(self.first, self.raws, *cols, self.nbytes)
        self.__init__(self.first + len(self.raws))
        return batch


def iter_batches(
    files: Sequence[str], text_mode: str = "file", start: Position = Position(), batch_bytes: int = 1 << 20,
    batch_records: int = 1 << 30,
) -> Iterator[RecordBatch]:
    """Stream records from `start` on, in batches of about batch_bytes and at most batch_records records
    (lines are never cut). Memory: one batch (or one whole text file in "file" mode)."""
    if text_mode not in TEXT_MODES:
        raise InputError(f"unknown text mode {text_mode!r}; use one of {TEXT_MODES}")
    acc = _BatchBuilder(start.record)
    for fi in range(start.file, len(files)):
        path = files[fi]
        offset = start.offset if fi == start.file else 0
        line = start.line if fi == start.file else 0
        with open_binary(path) as f:
            if offset:
                f.seek(offset)
            if not (is_jsonl(path) or text_mode == "line"):
                acc.add_file(fi, f.read())
                block = b""
            else:
                block = f.read(batch_bytes)
            while block:
                if not block.endswith(b"\n"):
                    block += f.readline()  # complete the last line
                lines = _split_lines(block)
                i = 0
                while i < len(lines):
                    part = lines[i : i + batch_records - len(acc.raws)]
                    i += len(part)
                    newline = i < len(lines) or block.endswith(b"\n")
                    offset = acc.add_lines(fi, part, offset, line, newline, is_jsonl(path))
                    line += len(part)
                    if len(acc.raws) >= batch_records:
                        yield acc.take()
                if acc.nbytes >= batch_bytes:
                    yield acc.take()
                block = f.read(batch_bytes)
        if acc.nbytes >= batch_bytes:
            yield acc.take()
    if acc.raws:
        yield acc.take()


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


def parse_batch(batch: RecordBatch, keys: Sequence[str], jsonl_by_file: Sequence[bool]) -> Tuple[dict, dict, list]:
    """The texts of a batch: (texts {key: [str]}, records {key: int64 (texts,) offset in the batch of each
    text's record}, skips [(record offset, key or None for the whole record, reason, detail)]), all in
    record order. The same results as parse_record on each record: a well-formed JSONL record takes a fast
    path (one orjson.loads), anything else goes through parse_record for its exact reason."""
    texts: Dict[str, List[str]] = {k: [] for k in keys}
    where: Dict[str, List[int]] = {k: [] for k in keys}
    skips: List[tuple] = []
    single = keys[0] if len(keys) == 1 else None
    jsonl_of = [jsonl_by_file[f] for f in batch.file.tolist()]
    for j, raw in enumerate(batch.raws):
        jsonl = jsonl_of[j]
        if jsonl and single is not None and not raw.startswith(_BOM):
            try:
                # orjson accepts only valid UTF-8 and no lone surrogates, and parses what json does, so a
                # text it returns is one parse_record would keep (once it is checked for emptiness)
                t = orjson.loads(raw)[single]
            except Exception:  # noqa: BLE001  (parse_record below names the problem)
                t = None
            if type(t) is str and t and not t.isspace():
                texts[single].append(t)
                where[single].append(j)
                continue
        try:
            parsed = parse_record(raw, jsonl, keys)
        except SkipRecord as s:
            skips.append((j, None, s.reason, s.detail))
            continue
        for k in keys:
            t = parsed[k]
            if isinstance(t, SkipRecord):
                skips.append((j, k, t.reason, t.detail))
            else:
                texts[k].append(t)
                where[k].append(j)
    return texts, {k: np.asarray(v, dtype=np.int64) for k, v in where.items()}, skips


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
    for batch in iter_batches(files, text_mode):
        for j, raw in enumerate(batch.raws):
            try:
                texts = parse_record(raw, is_jsonl(files[int(batch.file[j])]), keys)
            except SkipRecord:
                continue
            for k in keys:
                t = texts[k]
                if isinstance(t, str):
                    yield t


def input_fingerprint(files: Sequence[str]) -> List[dict]:
    """Path and size of each input (recorded in the manifest; part of the resume fingerprint)."""
    return [{"path": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in files]
