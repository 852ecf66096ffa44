#!/usr/bin/env python
"""A real-text English JSONL corpus (~130 MB) built from Debian documentation packages, for benchmarks.

    python benchmarks/text_corpus.py --output /work/corpus/debian_docs.jsonl

Steps: `apt-get download` the packages in PACKAGES into <output dir>/debs (skipped for .deb files already
there), `dpkg-deb -x` them into <output dir>/extracted, then turn their text into documents, in sorted
path order (so the same packages give the same corpus byte for byte):

  reStructuredText sources (Sphinx `_sources/*.txt`: the Linux kernel and Python documentation),
  HTML (Django, PostgreSQL, Node.js, GIMP help, the Debian administrator's handbook in English): the text
  outside <script>/<style>, one line per block element,
  Perl's POD manual pages, the GCIDE dictionary (one document per run of entries), WordNet glosses.

Each file's text is cut at blank lines into documents of at most --max-doc-chars characters (web-scale
corpora are mostly documents of a few KB). Writes one {"text", "source"} object per line; prints a JSON
summary. Needs a Debian system with apt (it runs `apt-get download`, not `apt-get install`).
"""
from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

PACKAGES = [
    "linux-doc-6.12", "python3.11-doc", "python-django-doc", "postgresql-doc-15", "nodejs-doc",
    "gimp-help-en", "debian-handbook", "perl-doc", "dict-gcide", "wordnet-base",
]
_BLOCK_TAGS = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "dt", "dd", "table", "section", "title"}


class _HTMLText(html.parser.HTMLParser):
    """The visible text of an HTML page: no <script>/<style>, a line break at each block element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._hidden += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._hidden = max(0, self._hidden - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self._hidden:
            self.parts.append(data)


def html_text(raw: str) -> str:
    p = _HTMLText()
    p.feed(raw)
    p.close()
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(p.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read(path: Path) -> str:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def texts_of(root: Path) -> Iterator[tuple]:
    """(source, text) for every usable file under the extracted packages, in sorted path order."""
    pages = sorted(p for d in ("usr/share/doc", "usr/share/gimp/2.0/help/en") for p in (root / d).rglob("*"))
    for path in pages:
        rel = path.relative_to(root).as_posix()
        if not path.is_file():
            continue
        if "/_sources/" in rel and rel.endswith(".txt"):
            yield rel, _read(path)
        elif rel.endswith((".html", ".html.gz")) and "/_sources/" not in rel and "/genindex" not in rel:
            if "debian-handbook" in rel and "/en-US/" not in rel:
                continue  # other languages: the corpus is English
            if "linux-doc" in rel or "/python3.11/" in rel:
                continue  # their reStructuredText sources are taken instead
            yield rel, html_text(_read(path))
    for path in sorted((root / "usr/share/perl").rglob("*.pod")):
        yield path.relative_to(root).as_posix(), _read(path)
    gcide = root / "usr/share/dictd/gcide.dict.dz"
    if gcide.is_file():  # dictzip is gzip with an index in the header: gzip reads it
        text = re.sub(r"<[^>]*>", "", gzip.open(gcide).read().decode("utf-8", errors="replace"))
        yield "gcide", text
    for part in ("noun", "verb", "adj", "adv"):
        f = root / f"usr/share/wordnet/data.{part}"
        if f.is_file():
            glosses = [line.split(" | ", 1)[1].strip() for line in _read(f).splitlines() if " | " in line]
            yield f"wordnet/{part}", "\n\n".join("\n".join(glosses[i : i + 20]) for i in range(0, len(glosses), 20))


def split_doc(text: str, max_chars: int) -> Iterator[str]:
    """Cut text at blank lines into pieces of at most max_chars (a longer paragraph stays whole)."""
    buf: List[str] = []
    n = 0
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        if buf and n + len(para) > max_chars:
            yield "\n\n".join(buf)
            buf, n = [], 0
        buf.append(para)
        n += len(para) + 2
    if buf:
        yield "\n\n".join(buf)


def build(output: str, max_doc_chars: int = 4000) -> dict:
    out_dir = Path(output).resolve().parent
    debs, root = out_dir / "debs", out_dir / "extracted"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True, stderr=subprocess.DEVNULL)
    if not root.is_dir():
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    docs = nbytes = 0
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for source, text in texts_of(root):
            for piece in split_doc(text, max_doc_chars):
                line = json.dumps({"text": piece, "source": source}, ensure_ascii=False) + "\n"
                f.write(line)
                docs += 1
                nbytes += len(line.encode("utf-8"))
    os.replace(tmp, output)
    return {"output": output, "docs": docs, "bytes": nbytes, "packages": PACKAGES}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="the JSONL to write; packages are downloaded beside it")
    ap.add_argument("--max-doc-chars", type=int, default=4000)
    args = ap.parse_args(argv)
    print(json.dumps(build(args.output, args.max_doc_chars)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
