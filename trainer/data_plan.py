"""Choosing the data without holding it: a source's *plan* (its documents in hash order as a compact index,
the tokenizer, the validation tokens, the shard boundaries) and the tokenization of one *shard*.

What is chosen is the module docstring of `data.py`; this module only changes how: the source is streamed
once keeping a digest and a byte range per document (`DOCUMENT`), documents are read back by byte range
when their text is needed, and the pool's token stream (the training documents in hash order, each
followed by eos, never cut) is tokenized shard by shard, one bounded chunk of documents at a time.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from dlmctl.spec.sections import DataSpec, TokenizerSpec

from .corpus import DataError, Document, Source, document_from_range, s3_filesystem
from .tokenizer import BPE_RECIPE_VERSION, Tokenizer

DOCUMENT = np.dtype([("digest", "S32"), ("file", "<u4"), ("start", "<u8"), ("end", "<u8"), ("kind", "u1"), ("part", "<u4")])
SCAN_BUFFER = 1 << 16  # documents buffered as Python tuples while a source is scanned
ENCODE_CHUNK_BYTES = 1 << 20  # text read back and tokenized at once
COPY_CHUNK = 1 << 20  # elements hashed, counted or copied at once


def utf8_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------------------------
# A source as a document index


def hash_order(docs: Sequence[Document]) -> list[Document]:
    """Documents sorted by the hash of their text: deterministic, content-only, seed-independent."""
    return sorted(docs, key=lambda d: d.digest)


def scan_source(source: Source) -> np.ndarray:
    """The source's unique documents in hash order as a `DOCUMENT` array (a duplicate keeps its first
    occurrence in sorted-file order, as `unique_documents` does). Only digests and ranges are kept."""
    chunks, buffer = [], []
    for file, doc in source.scan():
        buffer.append((hashlib.sha256(utf8_bytes(doc.text)).digest(), file, doc.start, doc.end, doc.kind, doc.part))
        if len(buffer) >= SCAN_BUFFER:
            chunks.append(np.array(buffer, dtype=DOCUMENT))
            buffer = []
    chunks.append(np.array(buffer, dtype=DOCUMENT))
    docs = np.concatenate(chunks)
    if not len(docs):
        raise source.no_documents()
    docs = docs[np.argsort(docs["digest"], kind="stable")]  # bytes order = hex order: `hash_order`
    first = np.ones(len(docs), bool)
    first[1:] = docs["digest"][1:] != docs["digest"][:-1]
    return docs[first]


def read_texts(source: Source, files: Sequence[str], docs: np.ndarray) -> list[str]:
    """The texts of `docs` (in their order), read back by byte range, in file order."""
    if not len(docs):
        return []
    order = np.lexsort((docs["start"], docs["file"]))
    data = source.read_ranges([files[i] for i in docs["file"][order]], docs["start"][order].tolist(),
                              docs["end"][order].tolist())
    texts: list[str] = [""] * len(docs)
    for i, raw in zip(order.tolist(), data):
        texts[i] = document_from_range(int(docs["kind"][i]), int(docs["part"][i]), raw)
    return texts


def iter_texts(source: Source, files: Sequence[str], docs: np.ndarray, chunk_bytes: int = ENCODE_CHUNK_BYTES) -> Iterator[list[str]]:
    """The texts of `docs` in order, in chunks of about `chunk_bytes` of source bytes."""
    before = np.concatenate([[0], np.cumsum((docs["end"] - docs["start"]).astype(np.int64))])
    start = 0
    while start < len(docs):
        stop = max(start + 1, int(np.searchsorted(before, before[start] + chunk_bytes)))
        yield read_texts(source, files, docs[start:stop])
        start = stop


def _flat(chunks: Iterable[list[str]]) -> Iterator[str]:
    for chunk in chunks:
        yield from chunk


# ---------------------------------------------------------------------------------------------
# Tokenizer and validation


def tokenizer_training_texts(docs: Iterable[Document | str], training_bytes: int) -> list[str]:
    """The BPE's training text: the first `training_bytes` UTF-8 bytes of `docs` in order, one text per
    document, the last one cut (a character the cut splits is left out)."""
    texts, size = [], 0
    for doc in docs:
        if size >= training_bytes:
            break
        text = doc if isinstance(doc, str) else doc.text
        data = utf8_bytes(text)
        kept = data[: training_bytes - size]
        texts.append(text if len(kept) == len(data) else kept.decode("utf-8", "ignore"))
        size += len(kept)
    return texts


def take_tokens(tokenizer: Tokenizer, texts: Iterable[list[str]], budget: int) -> tuple[np.ndarray, list[str]]:
    """Tokenize chunks of texts in order, each text followed by eos, until `budget` tokens: (tokens cut
    at `budget`, the texts used). Fewer tokens come back when the texts run out."""
    dtype, eos = token_dtype(tokenizer.vocab_size), np.array([tokenizer.eos_id])
    parts, used, total = [], [], 0
    for chunk in texts:
        for text, ids in zip(chunk, tokenizer.encode_batch(chunk)):
            if total >= budget:
                break
            parts.append(np.concatenate([np.asarray(ids, dtype=dtype), eos.astype(dtype)]))
            used.append(text)
            total += len(ids) + 1
        if total >= budget:
            break
    tokens = np.concatenate(parts)[:budget] if parts else np.zeros(0, dtype)
    return tokens, used


def text_bytes(tokenizer: Tokenizer, texts: Sequence[str], tokens: np.ndarray) -> int:
    """UTF-8 bytes of the text a stream of `take_tokens(tokenizer, texts, ...)` encodes: every whole
    document's text, plus, when the stream ends inside a document (no end-of-document last), the
    characters its kept tokens cover (a character split between kept and cut tokens counts whole).
    End-of-document tokens count 0 bytes."""
    eos = np.flatnonzero(np.asarray(tokens) == tokenizer.eos_id)
    whole = len(eos)
    total = sum(len(utf8_bytes(t)) for t in texts[:whole])
    kept = len(tokens) - (eos[-1] + 1 if whole else 0)
    if kept:
        text = texts[whole]
        total += len(utf8_bytes(text[: tokenizer.char_offsets(text)[kept - 1][1]]))
    return total


def read_tokenizer_file(path: str) -> bytes:
    try:
        if path.startswith("s3://"):
            return s3_filesystem().cat_file(path.removeprefix("s3://"))  # a tokenizer.json: small
        p = Path(path.removeprefix("file://")).expanduser()
        return (p / "tokenizer.json" if p.is_dir() else p).read_bytes()
    except (OSError, PermissionError) as err:
        raise DataError(f"spec.data.tokenizer.path: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None


def make_tokenizer(spec: TokenizerSpec, training_texts: Sequence[str]) -> Tokenizer:
    if spec.kind == "byte":
        return Tokenizer.byte()
    if spec.kind == "file":
        try:
            return Tokenizer.from_json(read_tokenizer_file(spec.path).decode("utf-8", "replace"))
        except DataError:
            raise
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise DataError(f"spec.data.tokenizer.path: {spec.path} is not a tokenizer.json: {str(err).splitlines()[0]}") from None
    return Tokenizer.train_bpe(training_texts, spec.vocab_size)


def tokenizer_key(spec: TokenizerSpec) -> dict:
    if spec.kind == "bpe":
        return {"kind": "bpe", "vocab_size": spec.vocab_size, "recipe": BPE_RECIPE_VERSION,
                "training_bytes": spec.training_bytes}
    if spec.kind == "file":
        return {"kind": "file", "sha256": hashlib.sha256(read_tokenizer_file(spec.path)).hexdigest()}
    return {"kind": "byte"}


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    files: list[str]  # the training source's files; `documents["file"]` indexes them
    documents: np.ndarray  # DOCUMENT: the pool's candidates, training documents in hash order
    shard_starts: np.ndarray  # shard j holds documents [shard_starts[j], shard_starts[j + 1])
    tokenizer: Tokenizer
    val: np.ndarray  # exactly validation_tokens tokens
    stats: dict

    @property
    def num_shards(self) -> int:
        return len(self.shard_starts) - 1

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.tokenizer.vocab_size)


def shard_boundaries(docs: np.ndarray, text_bytes_per_shard: int) -> np.ndarray:
    """Starts of the shards (and the end): a new shard every `text_bytes_per_shard` source bytes
    (`spec.data.preparation.shard_bytes`)."""
    before = np.concatenate([[0], np.cumsum((docs["end"] - docs["start"]).astype(np.int64))[:-1]]) if len(docs) else np.zeros(0, np.int64)
    shard_of = before // max(1, text_bytes_per_shard)
    starts = np.flatnonzero(np.diff(shard_of)) + 1
    return np.concatenate([[0], starts, [len(docs)]]).astype(np.int64) if len(docs) else np.zeros(1, np.int64)


def build_plan(spec: DataSpec, train: Source, validation: Optional[Source]) -> Plan:
    """Stream the sources once and choose the documents (the module docstring of `data.py`)."""
    V = spec.validation_tokens
    files, docs = train.files(), scan_source(train)
    source_documents = len(docs)
    bpe = spec.tokenizer.kind == "bpe"
    if validation is not None:
        val_files, val_docs = validation.files(), scan_source(validation)
        docs = docs[~np.isin(docs["digest"], val_docs["digest"])]  # a text in both sources is validation
        texts = tokenizer_training_texts(_flat(iter_texts(train, files, docs)), spec.tokenizer.training_bytes) if bpe else []
        tokenizer = make_tokenizer(spec.tokenizer, texts)
        val, val_texts = take_tokens(tokenizer, iter_texts(validation, val_files, val_docs), V)
        if len(val) < V:
            raise DataError(f"spec.data.validation_tokens: {V:,} tokens asked but {spec.validation} has only {len(val):,}")
    else:
        tokenizer, texts, val, val_texts = _hold_out_validation(spec, train, files, docs)
        docs = docs[: len(docs) - len(val_texts)]
    stats = {
        "source_documents": source_documents,
        "candidate_documents": len(docs),
        "validation_documents": len(val_texts),
        "tokenizer_training_documents": len(texts),
        "tokenizer_training_bytes": sum(len(utf8_bytes(t)) for t in texts),
        "validation_bytes": text_bytes(tokenizer, val_texts, val),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "mask_id": tokenizer.mask_id,
        "dtype": str(token_dtype(tokenizer.vocab_size)),
    }
    return Plan(files, docs, shard_boundaries(docs, spec.preparation.shard_bytes), tokenizer, val, stats)


def _hold_out_validation(spec: DataSpec, source: Source, files: list[str], docs: np.ndarray):
    """(tokenizer, its training texts, validation tokens, validation texts) when validation is held out
    of the training source: the last documents in hash order, read backwards, up to `validation_tokens`
    tokens. How many documents that takes depends on the tokenizer, which must not see them: train it on
    the start of all documents; while its text reaches into the documents validation takes, train it
    again without them. The excluded tail only grows, so this ends (at once when the training text and
    the validation are far apart, as on any source much larger than `training_bytes`)."""
    V, excluded = spec.validation_tokens, 0
    while True:
        kept = docs[: len(docs) - excluded]
        texts = (tokenizer_training_texts(_flat(iter_texts(source, files, kept)), spec.tokenizer.training_bytes)
                 if spec.tokenizer.kind == "bpe" else [])
        tokenizer = make_tokenizer(spec.tokenizer, texts)
        val, val_texts = take_tokens(tokenizer, iter_texts(source, files, docs[::-1]), V)
        if len(val) < V:
            raise DataError(
                f"spec.data.validation_tokens: {V:,} tokens asked but {spec.train} has only {len(val):,} tokens in all "
                f"(and spec.data.unique_tokens must be left); lower them or set spec.data.validation"
            )
        if len(texts) <= len(docs) - len(val_texts):
            return tokenizer, texts, val, val_texts
        excluded = len(val_texts)


# ---------------------------------------------------------------------------------------------
# A shard


NPY_HEADER_BYTES = 128  # room for any 1-D shape, so the header is written before the length is known


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """A .npy (version 1.0) header of exactly NPY_HEADER_BYTES for a 1-D array (padded with spaces, as numpy pads)."""
    body = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (np.lib.format.dtype_to_descr(dtype), length)
    body = body.ljust(NPY_HEADER_BYTES - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def build_shard(plan: Plan, source: Source, j: int, folder: Path) -> dict:
    """Tokenize shard j into `folder` (tokens.npy written as it goes, documents.npy: each document's end
    in the shard's tokens, counts.npy: unigram counts) and return its manifest. Memory: one chunk of
    documents and the shard's document ends."""
    tokenizer, dtype = plan.tokenizer, plan.dtype
    docs = plan.documents[plan.shard_starts[j]:plan.shard_starts[j + 1]]
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    ends, total = [], 0
    with open(folder / "tokens.npy", "wb") as out:
        out.write(b"\0" * NPY_HEADER_BYTES)
        for texts in iter_texts(source, plan.files, docs):
            ids = tokenizer.encode_batch(texts)
            lengths = np.array([len(i) + 1 for i in ids], np.int64)
            chunk = np.full(int(lengths.sum()), tokenizer.eos_id, dtype)
            at = 0
            for i, n in zip(ids, lengths.tolist()):
                chunk[at:at + n - 1] = i
                at += n
            out.write(chunk.tobytes())
            counts += np.bincount(chunk, minlength=tokenizer.vocab_size)
            ends.append(total + np.cumsum(lengths))
            total += len(chunk)
        out.seek(0)
        out.write(_npy_header(dtype, total))
    np.save(folder / "documents.npy", np.concatenate(ends) if ends else np.zeros(0, np.int64))
    np.save(folder / "counts.npy", counts)
    return {"shard": j, "documents": [int(plan.shard_starts[j]), int(plan.shard_starts[j + 1])], "tokens": total,
            "sha256": {name: file_sha256(folder / f"{name}.npy") for name in ("tokens", "documents", "counts")}}
