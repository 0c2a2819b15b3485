"""Text sources → documents: the built-in Python standard library, local files and folders, S3 objects.

A source is `builtin:python-stdlib`, a local file or folder, or an `s3://bucket/key-or-prefix`. Its
files are read in sorted order and turned into documents by these rules, one rule per kind of file:

- `.jsonl`: one document per line, the line's `"text"` field (lines without one are skipped);
- `.txt` larger than `SPLIT_TXT_BYTES`: the file is itself a corpus and is split — at WikiText
  article headings (a line ` = Title = `) when it has them, otherwise into runs of whole
  blank-line-separated paragraphs of about `PARAGRAPH_RUN_CHARS` characters (tiny Shakespeare);
- any other `.txt`, `.md`, `.py`: one document per file.

Whitespace-only documents are dropped and exact duplicates (same text) are kept once, so a
document is identified by the hash of its text (`Document.digest`).

`Source.scan()` streams a source's documents with where each one lies (`Located`: file, byte range,
kind), so a document can be read back later from its byte range alone (`Source.read_ranges` and
`document_from_range`), without keeping its text: `.jsonl` files are read line by line; other files
are read whole, one at a time.

`Source.fingerprint()` identifies the content without parsing it: a hash of every file's path and
bytes (local) or path, size and ETag (S3), so a token cache can be found without reading an S3
corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Iterator

from dlmctl.spec.load import SpecError
from .storage import s3_filesystem

SUFFIXES = (".txt", ".md", ".py", ".jsonl")
SPLIT_TXT_BYTES = 64 * 1024
PARAGRAPH_RUN_CHARS = 4096
CORPUS_RULES_VERSION = 1  # bump when the rules above change: it is part of every cache key

# Parts of the standard library that are tests, generated tables or third-party code, not library code.
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
STDLIB_GENERATED_MARKERS = ("with gencodec.py",)  # encodings/cp*.py: character tables generated from vendor files

WIKITEXT_ARTICLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)
BLANK_LINES = re.compile(r"\n[ \t]*\n+")

# How a document is read back from its byte range (see `document_from_range`).
KIND_TEXT, KIND_JSONL, KIND_ARTICLE, KIND_PARAGRAPHS = 0, 1, 2, 3


class DataError(SpecError):
    """A problem with the data a spec asks for: one line that names the field."""


@dataclass(frozen=True)
class Document:
    name: str  # where it came from, e.g. "json/decoder.py" or "input.txt#12"
    text: str

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Located:
    """A document and where it lies in its file: bytes [start, end) read back with `document_from_range`."""

    text: str
    start: int
    end: int
    kind: int
    part: int = 0  # KIND_JSONL: which of the range's lines (str.splitlines) holds the record


def document_from_range(kind: int, part: int, data: bytes) -> str:
    """The document that a `Located` range's bytes hold."""
    text = data.decode("utf-8", errors="replace")
    if kind == KIND_JSONL:
        return json.loads(text.splitlines()[part])["text"]
    if kind == KIND_ARTICLE:
        return text.strip("\n")
    if kind == KIND_PARAGRAPHS:
        return "\n\n".join(p.strip("\n") for p in BLANK_LINES.split(text) if p.strip())
    return text


def locate_jsonl(name: str, handle: BinaryIO) -> Iterator[Located]:
    """A `.jsonl` file's records, read line by line. Cutting the bytes at b"\\n" changes neither the
    decoded text (a newline ends any invalid UTF-8 sequence) nor `splitlines` (its only two-character
    break, \\r\\n, ends with \\n), so a record is found again in its b"\\n"-terminated range."""
    offset, line_number = 0, 0
    for raw in handle:
        for part, line in enumerate(raw.decode("utf-8", errors="replace").splitlines()):
            line_number += 1
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                raise DataError(f"{name}: line {line_number} is not valid JSON") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield Located(record["text"], offset, offset + len(raw), KIND_JSONL, part)
        offset += len(raw)


def locate_in_file(name: str, data: bytes) -> list[Located]:
    """The documents of one non-`.jsonl` file (see the module docstring) and their byte ranges."""
    try:
        text, valid = data.decode("utf-8"), True
    except UnicodeDecodeError:
        text, valid = data.decode("utf-8", errors="replace"), False
    if not (Path(name).suffix.lower() == ".txt" and len(data) > SPLIT_TXT_BYTES):
        return [Located(text, 0, len(data), KIND_TEXT)]
    if WIKITEXT_ARTICLE.search(text):
        kind, ranges = KIND_ARTICLE, _article_ranges(text)
    else:
        kind, ranges = KIND_PARAGRAPHS, _paragraph_run_ranges(text)
    bounds = _byte_offsets(data, text, sorted({c for r in ranges for c in r}), valid)
    return [Located(_document_text(kind, text[a:b]), bounds[a], bounds[b], kind) for a, b in ranges]


def _document_text(kind: int, text: str) -> str:
    if kind == KIND_ARTICLE:
        return text.strip("\n")
    return "\n\n".join(p.strip("\n") for p in BLANK_LINES.split(text) if p.strip())


def _article_ranges(text: str) -> list[tuple[int, int]]:
    starts = [m.start() for m in WIKITEXT_ARTICLE.finditer(text)]
    if starts[0] > 0:
        starts.insert(0, 0)
    return list(zip(starts, starts[1:] + [len(text)]))


def _paragraph_run_ranges(text: str) -> list[tuple[int, int]]:
    """Runs of whole paragraphs of about PARAGRAPH_RUN_CHARS characters as character ranges that tile the
    text: a run ends after the separator that follows its last paragraph, so every boundary is 0, the
    text's end or just after a newline."""
    runs, run_start, size, piece_start = [], 0, 0, 0
    for separator in [*BLANK_LINES.finditer(text), None]:
        piece_end = separator.start() if separator else len(text)
        next_start = separator.end() if separator else len(text)
        paragraph = text[piece_start:piece_end]
        if paragraph.strip():
            size += len(paragraph)
            if size >= PARAGRAPH_RUN_CHARS:
                runs.append((run_start, next_start))
                run_start, size = next_start, 0
        piece_start = next_start
    if size:
        runs.append((run_start, len(text)))
    return runs


def _byte_offsets(data: bytes, text: str, chars: list[int], valid: bool) -> dict[int, int]:
    """Byte offset in `data` of each character offset in `chars` (sorted; each 0, the end, or just after a
    newline). Invalid UTF-8 decodes with replacements of other lengths: count newlines instead."""
    out, char_pos, byte_pos = {}, 0, 0
    for c in chars:
        if c == len(text):
            byte_pos = len(data)
        elif valid:
            byte_pos += len(text[char_pos:c].encode())
        else:
            for _ in range(text.count("\n", char_pos, c)):
                byte_pos = data.index(b"\n", byte_pos) + 1
        out[c], char_pos = byte_pos, c
    return out


def documents_from_file(name: str, data: bytes) -> list[Document]:
    """Apply the per-file rules of the module docstring to one file's bytes."""
    if Path(name).suffix.lower() == ".jsonl":
        import io

        return [Document(f"{name}#{i}", d.text) for i, d in enumerate(locate_jsonl(name, io.BytesIO(data)))]
    return [Document(f"{name}#{i}" if d.kind != KIND_TEXT else name, d.text) for i, d in enumerate(locate_in_file(name, data))]


def _split_articles(text: str) -> list[str]:
    return [_document_text(KIND_ARTICLE, text[a:b]) for a, b in _article_ranges(text)]


def _paragraph_runs(text: str) -> list[str]:
    return [_document_text(KIND_PARAGRAPHS, text[a:b]) for a, b in _paragraph_run_ranges(text)]


def unique_documents(docs: list[Document]) -> list[Document]:
    """Drop whitespace-only documents and exact duplicates (the first one is kept)."""
    seen, kept = set(), []
    for doc in docs:
        if doc.text.strip() and doc.digest not in seen:
            seen.add(doc.digest)
            kept.append(doc)
    return kept


class Source:
    """A text source of the spec (`spec.data.train` / `spec.data.validation`)."""

    def __init__(self, uri: str, field: str = "spec.data.train"):
        self.uri, self.field = uri, field

    def files(self) -> list[str]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def read_ranges(self, names: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
        """Bytes [start, end) of each named file (S3: concurrent range requests)."""
        raise NotImplementedError

    def keep(self, text: str) -> bool:
        return True

    def scan(self) -> Iterator[tuple[int, Located]]:
        """(file index in `files()`, document) for every non-blank document in sorted-file order,
        duplicates included: one file in memory at a time, a `.jsonl` file one line at a time."""
        try:
            for index, name in enumerate(self.files()):
                if Path(name).suffix.lower() == ".jsonl":
                    with self.open(name) as handle:
                        found = locate_jsonl(name, handle)
                        yield from ((index, d) for d in found if d.text.strip() and self.keep(d.text))
                else:
                    yield from ((index, d) for d in locate_in_file(name, self.read(name)) if d.text.strip() and self.keep(d.text))
        except DataError as err:
            raise DataError(f"{self.field}: {err}") from None

    def no_documents(self) -> DataError:
        return DataError(f"{self.field}: {self.uri} holds no text documents ({', '.join(SUFFIXES)})")

    def documents(self) -> list[Document]:
        """Every document of the source, duplicates and blank ones removed, in sorted-file order."""
        try:
            docs = [doc for name in self.files() for doc in documents_from_file(name, self.read(name))]
        except DataError as err:
            raise DataError(f"{self.field}: {err}") from None
        docs = [d for d in unique_documents(docs) if self.keep(d.text)]
        if not docs:
            raise self.no_documents()
        return docs


class LocalSource(Source):
    def __init__(self, uri: str, field: str = "spec.data.train", root: Path | None = None):
        super().__init__(uri, field)
        path = Path(uri.removeprefix("file://")).expanduser()
        self.root = root or path
        self._files: list[str] | None = None
        if not self.root.exists():
            raise DataError(f"{field}: {uri} does not exist")

    def files(self) -> list[str]:
        if self._files is None:
            self._files = [self.root.name] if self.root.is_file() else sorted(self._walk())
        return self._files

    def _walk(self):
        for folder, dirs, names in os.walk(self.root):
            dirs[:] = [d for d in dirs if self._folder_included(d)]
            for name in names:
                relative = (Path(folder) / name).relative_to(self.root)
                if Path(name).suffix.lower() in SUFFIXES and self._file_included(relative):
                    yield relative.as_posix()

    def _folder_included(self, name: str) -> bool:
        return not name.startswith(".")

    def _file_included(self, relative: Path) -> bool:
        return not relative.name.startswith(".")

    def _path(self, name: str) -> Path:
        return self.root if self.root.is_file() else self.root / name

    def read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def open(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")

    def read_ranges(self, names: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
        out = []
        for name, start, end in zip(names, starts, ends):
            with open(self._path(name), "rb") as handle:
                handle.seek(start)
                out.append(handle.read(end - start))
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"corpus-rules-{CORPUS_RULES_VERSION}".encode())
        for name in self.files():
            h.update(f"\0{name}\0".encode())
            file_hash = hashlib.sha256()
            with self.open(name) as handle:  # streamed: a large file is never held whole
                while block := handle.read(1 << 22):
                    file_hash.update(block)
            h.update(file_hash.digest())
        return h.hexdigest()


class PythonStdlibSource(LocalSource):
    """The running interpreter's own standard library: its human-written `.py` modules, one
    document per file. Test suites, generated codec tables and site-packages are left out."""

    def __init__(self, field: str = "spec.data.train"):
        super().__init__("builtin:python-stdlib", field, root=Path(sysconfig.get_paths()["stdlib"]))

    def _folder_included(self, name: str) -> bool:
        return name not in STDLIB_EXCLUDED_DIRS and super()._folder_included(name)

    def _file_included(self, relative: Path) -> bool:
        return relative.suffix == ".py" and not relative.name.startswith("_sysconfigdata")

    def keep(self, text: str) -> bool:
        return not any(marker in text[:1000] for marker in STDLIB_GENERATED_MARKERS)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"python-{sys.version}\0{super().fingerprint()}".encode()).hexdigest()


class S3Source(Source):
    def __init__(self, uri: str, field: str = "spec.data.train"):
        super().__init__(uri, field)
        self.fs = s3_filesystem()
        self.path = uri.removeprefix("s3://").rstrip("/")

    @cached_property
    def _listing(self) -> dict[str, dict]:
        try:
            if self.fs.isfile(self.path):
                return {Path(self.path).name: self.fs.info(self.path) | {"_key": self.path}}
            found = self.fs.find(self.path, detail=True)
        except Exception as err:  # s3fs/botocore: missing bucket, no credentials, endpoint unreachable
            raise DataError(f"{self.field}: cannot read {self.uri}: {(str(err) or type(err).__name__).splitlines()[0]}") from None
        return {
            key[len(self.path):].lstrip("/"): info | {"_key": key}
            for key, info in found.items()
            if Path(key).suffix.lower() in SUFFIXES and info.get("type") != "directory"
        }

    def files(self) -> list[str]:
        if not self._listing:
            raise DataError(f"{self.field}: {self.uri} does not exist or holds no {', '.join(SUFFIXES)} files")
        return sorted(self._listing)

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self._listing[name]["_key"])

    def open(self, name: str) -> BinaryIO:
        return self.fs.open(self._listing[name]["_key"], "rb")

    def read_ranges(self, names: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
        return self.fs.cat_ranges([self._listing[n]["_key"] for n in names], list(starts), list(ends))

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"corpus-rules-{CORPUS_RULES_VERSION}\0s3".encode())
        for name in self.files():
            info = self._listing[name]
            h.update(f"\0{name}\0{info.get('size')}\0{info.get('ETag') or info.get('etag')}".encode())
        return h.hexdigest()


def open_source(uri: str, field: str = "spec.data.train") -> Source:
    if uri == "builtin:python-stdlib":
        return PythonStdlibSource(field)
    if uri.startswith("builtin:"):
        raise DataError(f"{field}: unknown built-in corpus {uri!r}")
    if uri.startswith("s3://"):
        return S3Source(uri, field)
    return LocalSource(uri, field)


