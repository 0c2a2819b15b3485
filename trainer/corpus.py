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


class DataError(SpecError):
    """A problem with the data a spec asks for: one line that names the field."""


@dataclass(frozen=True)
class Document:
    name: str  # where it came from, e.g. "json/decoder.py" or "input.txt#12"
    text: str

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


def documents_from_file(name: str, data: bytes) -> list[Document]:
    """Apply the per-file rules of the module docstring to one file's bytes."""
    text = data.decode("utf-8", errors="replace")
    suffix = Path(name).suffix.lower()
    if suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines()):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                raise DataError(f"{name}: line {i + 1} is not valid JSON") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                docs.append(Document(f"{name}#{i}", record["text"]))
        return docs
    if suffix == ".txt" and len(data) > SPLIT_TXT_BYTES:
        parts = _split_articles(text) if WIKITEXT_ARTICLE.search(text) else _paragraph_runs(text)
        return [Document(f"{name}#{i}", part) for i, part in enumerate(parts)]
    return [Document(name, text)]


def _split_articles(text: str) -> list[str]:
    starts = [m.start() for m in WIKITEXT_ARTICLE.finditer(text)]
    if starts[0] > 0:
        starts.insert(0, 0)
    return [text[a:b].strip("\n") for a, b in zip(starts, starts[1:] + [len(text)])]


def _paragraph_runs(text: str) -> list[str]:
    runs, current, size = [], [], 0
    for paragraph in BLANK_LINES.split(text):
        if not paragraph.strip():
            continue
        current.append(paragraph.strip("\n"))
        size += len(paragraph)
        if size >= PARAGRAPH_RUN_CHARS:
            runs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        runs.append("\n\n".join(current))
    return runs


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

    def documents(self) -> list[Document]:
        """Every document of the source, duplicates and blank ones removed, in sorted-file order."""
        try:
            docs = [doc for name in self.files() for doc in documents_from_file(name, self.read(name))]
        except DataError as err:
            raise DataError(f"{self.field}: {err}") from None
        docs = unique_documents(docs)
        if not docs:
            raise DataError(f"{self.field}: {self.uri} holds no text documents ({', '.join(SUFFIXES)})")
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

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"corpus-rules-{CORPUS_RULES_VERSION}".encode())
        for name in self.files():
            h.update(f"\0{name}\0".encode())
            h.update(hashlib.sha256(self.read(name)).digest())
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

    def documents(self) -> list[Document]:
        docs = super().documents()
        return [d for d in docs if not any(marker in d.text[:1000] for marker in STDLIB_GENERATED_MARKERS)]

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


