"""The data pipeline: sources → tokenizer → token shards cached by content hash → epochs of sequences.

`prepare_data(spec.data, seed, cache_root)` gives a `PreparedData`: the tokenizer, the unique
training sequences, the validation tokens and a metadata dict. How the data is chosen:

1. Documents (see `corpus.py`) are put in *hash order*: sorted by the SHA-256 of their text. The
   order depends on the content only, never on the seed, file names or the machine.
2. Validation: with `spec.data.validation` set, its documents in hash order; otherwise documents
   held out from the *end* of the training source's hash order, while training documents are
   taken from its *start*, so the two never share a document. Exactly `validation_tokens` tokens.
3. Tokenizer (one per experiment): a byte-level BPE is trained on the first
   `spec.data.tokenizer.training_bytes` bytes of the training documents in hash order (the last
   one cut), whatever `unique_tokens` is, so every sweep point of an experiment gets the same
   tokenizer and per-token losses compare across the sweep. Held-out validation documents are
   never part of that text (see `_hold_out_validation`).
4. Unique pool: training documents in hash order, each followed by `eos_id`, concatenated and cut
   at exactly `unique_tokens` tokens (whole documents, except the last which may be cut). N =
   floor(unique_tokens / seq_len) windows of seq_len tokens are trained on per epoch; the
   *effective* unique tokens reported in the metadata are N × seq_len.
5. Packing (`spec.data.packing`). fixed: the pool is cut into its N windows once (`PreparedData.
   train`), the same every epoch. per-epoch (Megatron): for every epoch e the pool's whole
   documents are permuted (keyed by seed and e), concatenated with the cut last document kept at
   the end (it has no end-of-document, so only the end can hold it), and re-cut into N windows, so
   window boundaries move from epoch to epoch while every epoch holds the pool's tokens less the
   stream's last unique_tokens mod seq_len; a window is gathered through document offsets, so
   nothing but the pool is held in memory.
6. Epochs (`EpochSampler`): global sample k → epoch e = k // N, position p = k % N → window
   perm_e[p], with perm_e a permutation seeded by (seed, e). Step s of global batch G consumes
   samples s*G ... s*G+G-1; rank r of W at micro-step a with micro batch m takes samples
   s*G + (a*W + r)*m + [0, m). Nothing depends on the rank beyond choosing its slice, so a run
   sees the same sequences on any world size, and after resuming on a different one.

The token pool, validation tokens and tokenizer are cached under a key hashing (source content
fingerprints, tokenizer config with its training bytes, unique_tokens, validation_tokens): not seq_len,
packing nor seed, so every arm, seed, sequence length and packing of a sweep shares one cache entry.
A second run loads it without tokenizing; entries are written atomically (a temporary directory
renamed into place; on S3 the manifest is uploaded last), processes on one machine wait on a lock
for the one that builds, and processes elsewhere build byte-identical entries.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from dlmctl.spec.sections import DataSpec, TokenizerSpec

from .corpus import DataError, Document, Source, open_source, s3_filesystem
from .tokenizer import BPE_RECIPE_VERSION, Tokenizer

__all__ = [
    "ChoiceExample", "DataError", "EpochSampler", "PreparedData", "RepackedBatches", "TrainBatches", "Tokenizer",
    "choice_examples", "hash_order", "prepare_data", "sample_indices", "tokenizer_training_texts", "unigram_entropy",
    "val_batches",
]

DATA_FORMAT_VERSION = 2  # bump when what a cache entry holds, or how it is chosen, changes
ENCODE_CHUNK_CHARS = 1 << 20
DATA_ORDER_STREAM = 0x64617461  # "data": keeps the data-order RNG apart from other users of the seed
PACKING_STREAM = 0x7061636B  # "pack": the per-epoch document order
CHOICE_STREAM = 0x63686F69  # "choi"
CACHE_FILES = ("tokenizer.json", "train.npy", "val.npy")


# ---------------------------------------------------------------------------------------------
# Choosing and tokenizing documents


def hash_order(docs: Sequence[Document]) -> list[Document]:
    """Documents sorted by the hash of their text: deterministic, content-only, seed-independent."""
    return sorted(docs, key=lambda d: d.digest)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def take_tokens(tokenizer: Tokenizer, docs: Sequence[Document], budget: int) -> tuple[np.ndarray, int]:
    """Tokenize `docs` in order, each followed by eos, until `budget` tokens: returns (tokens cut at
    `budget`, documents used). Fewer tokens come back when the documents run out."""
    dtype, eos = token_dtype(tokenizer.vocab_size), np.array([tokenizer.eos_id])
    parts, total, used, i = [], 0, 0, 0
    while total < budget and i < len(docs):
        chunk, chars = [], 0
        while i < len(docs) and chars < ENCODE_CHUNK_CHARS:
            chunk.append(docs[i].text)
            chars += len(docs[i].text)
            i += 1
        for ids in tokenizer.encode_batch(chunk):
            if total >= budget:
                break
            parts.append(np.concatenate([np.asarray(ids, dtype=dtype), eos.astype(dtype)]))
            total += len(ids) + 1
            used += 1
    tokens = np.concatenate(parts)[:budget] if parts else np.zeros(0, dtype)
    return tokens, used


def utf8_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def tokenizer_training_texts(docs: Sequence[Document], training_bytes: int) -> list[str]:
    """The BPE's training text: the first `training_bytes` UTF-8 bytes of `docs` in order, one text
    per document, the last one cut (a character the cut splits is left out)."""
    texts, size = [], 0
    for doc in docs:
        if size >= training_bytes:
            break
        data = utf8_bytes(doc.text)
        kept = data[: training_bytes - size]
        texts.append(doc.text if len(kept) == len(data) else kept.decode("utf-8", "ignore"))
        size += len(kept)
    return texts


def make_tokenizer(spec: TokenizerSpec, training_texts: Sequence[str]) -> Tokenizer:
    if spec.kind == "byte":
        return Tokenizer.byte()
    if spec.kind == "file":
        try:
            return Tokenizer.from_json(_read_tokenizer_file(spec.path).decode("utf-8", "replace"))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise DataError(f"spec.data.tokenizer.path: {spec.path} is not a tokenizer.json: {str(err).splitlines()[0]}") from None
    return Tokenizer.train_bpe(training_texts, spec.vocab_size)


def text_bytes(tokenizer: Tokenizer, docs: Sequence[Document], tokens: np.ndarray) -> int:
    """UTF-8 bytes of the text a stream of `take_tokens(tokenizer, docs, ...)` encodes: every whole
    document's text, plus, when the stream ends inside a document (no end-of-document last), the
    characters its kept tokens cover (a character split between kept and cut tokens counts whole).
    End-of-document tokens count 0 bytes."""
    eos = np.flatnonzero(np.asarray(tokens) == tokenizer.eos_id)
    whole = len(eos)
    total = sum(len(utf8_bytes(d.text)) for d in docs[:whole])
    kept = len(tokens) - (eos[-1] + 1 if whole else 0)
    if kept:
        text = docs[whole].text
        total += len(utf8_bytes(text[: tokenizer.char_offsets(text)[kept - 1][1]]))
    return total


def _read_tokenizer_file(path: str) -> bytes:
    field_name = "spec.data.tokenizer.path"
    try:
        if path.startswith("s3://"):
            return s3_filesystem().cat_file(path.removeprefix("s3://"))
        p = Path(path.removeprefix("file://")).expanduser()
        return (p / "tokenizer.json" if p.is_dir() else p).read_bytes()
    except (OSError, PermissionError) as err:
        raise DataError(f"{field_name}: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None


def _tokenizer_key(spec: TokenizerSpec) -> dict:
    if spec.kind == "bpe":
        return {"kind": "bpe", "vocab_size": spec.vocab_size, "recipe": BPE_RECIPE_VERSION,
                "training_bytes": spec.training_bytes}
    if spec.kind == "file":
        return {"kind": "file", "sha256": hashlib.sha256(_read_tokenizer_file(spec.path)).hexdigest()}
    return {"kind": "byte"}


@dataclass
class _Built:
    tokenizer: Tokenizer
    train: np.ndarray  # the unique pool: exactly unique_tokens tokens
    val: np.ndarray  # exactly validation_tokens tokens
    manifest: dict


def _hold_out_validation(spec: DataSpec, train_docs: list[Document]) -> tuple[Tokenizer, list[str], np.ndarray, int]:
    """(tokenizer, its training texts, validation tokens, validation documents) when validation is held
    out of the training source: the last documents in hash order, read backwards, up to
    `validation_tokens` tokens. How many documents that takes depends on the tokenizer, which must not
    see them: train it on the start of all documents; while its text reaches into the documents
    validation takes, train it again without them. The excluded tail only grows, so this ends (at once
    when the training text and the validation are far apart, as on any source much larger than
    `training_bytes`)."""
    V, excluded = spec.validation_tokens, 0
    while True:
        texts = (tokenizer_training_texts(train_docs[: len(train_docs) - excluded], spec.tokenizer.training_bytes)
                 if spec.tokenizer.kind == "bpe" else [])
        tokenizer = make_tokenizer(spec.tokenizer, texts)
        val, val_used = take_tokens(tokenizer, train_docs[::-1], V)
        if len(val) < V:
            raise DataError(
                f"spec.data.validation_tokens: {V:,} tokens asked but {spec.train} has only {len(val):,} tokens in all "
                f"(and spec.data.unique_tokens must be left); lower them or set spec.data.validation"
            )
        if len(texts) <= len(train_docs) - val_used:
            return tokenizer, texts, val, val_used
        excluded = val_used


def _build(spec: DataSpec, train_source: Source, val_source: Optional[Source]) -> _Built:
    U, V = spec.unique_tokens, spec.validation_tokens
    train_docs = hash_order(train_source.documents())
    source_documents = len(train_docs)
    if val_source is not None:
        val_docs = hash_order(val_source.documents())
        held = {d.digest for d in val_docs}
        train_docs = [d for d in train_docs if d.digest not in held]  # a text in both sources is validation
        texts = tokenizer_training_texts(train_docs, spec.tokenizer.training_bytes) if spec.tokenizer.kind == "bpe" else []
        tokenizer = make_tokenizer(spec.tokenizer, texts)
        val, val_used = take_tokens(tokenizer, val_docs, V)
        if len(val) < V:
            raise DataError(f"spec.data.validation_tokens: {V:,} tokens asked but {spec.validation} has only {len(val):,}")
        pool_candidates, val_read = train_docs, val_docs
    else:
        tokenizer, texts, val, val_used = _hold_out_validation(spec, train_docs)
        pool_candidates, val_read = train_docs[: len(train_docs) - val_used], train_docs[::-1]
    pool, pool_used = take_tokens(tokenizer, pool_candidates, U)
    if len(pool) < U:
        held_out = "" if val_source is not None else f" after holding out {V:,} validation tokens"
        raise DataError(
            f"spec.data.unique_tokens: {U:,} tokens asked but {spec.train} has only {len(pool):,} training tokens{held_out}"
        )
    manifest = {
        "format": DATA_FORMAT_VERSION,
        "source_documents": source_documents,
        "pool_documents": pool_used,
        "validation_documents": val_used,
        "tokenizer_training_documents": len(texts),
        "tokenizer_training_bytes": sum(len(utf8_bytes(t)) for t in texts),
        "validation_bytes": text_bytes(tokenizer, val_read, val),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "mask_id": tokenizer.mask_id,
        "dtype": str(pool.dtype),
    }  # no timings: processes that build the same entry write the same bytes
    return _Built(tokenizer, pool, val, manifest)


# ---------------------------------------------------------------------------------------------
# The cache: <root>/<key>/{tokenizer.json, train.npy, val.npy, manifest.json}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class TokenCache:
    """Cache entries in a local directory, optionally mirrored from/to an s3:// prefix."""

    def __init__(self, location: str | Path, local_root: Path):
        self.remote = str(location).removeprefix("s3://").rstrip("/") if str(location).startswith("s3://") else None
        self.local_root = Path(local_root if self.remote else str(location).removeprefix("file://")).expanduser()

    def local(self, key: str) -> Path:
        return self.local_root / key

    @contextlib.contextmanager
    def lock(self, key: str):
        """Processes on one machine take turns: the first builds, the others then find the entry."""
        self.local_root.mkdir(parents=True, exist_ok=True)
        with open(self.local_root / f".{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def find(self, key: str) -> Optional[Path]:
        """The local directory of a complete entry, fetched from S3 when only there; else None."""
        path = self.local(key)
        if self.remote is None:
            return path if (path / "manifest.json").exists() else None
        fs, prefix = s3_filesystem(), f"{self.remote}/{key}"
        remote_complete = fs.exists(f"{prefix}/manifest.json")
        if (path / "manifest.json").exists():
            if not remote_complete:  # built here before the S3 cache was configured: share it
                self._upload(key, {name: (path / name).read_bytes() for name in CACHE_FILES},
                             (path / "manifest.json").read_bytes())
            return path
        if not remote_complete:
            return None
        manifest = fs.cat_file(f"{prefix}/manifest.json")
        files = {name: fs.cat_file(f"{prefix}/{name}") for name in CACHE_FILES}
        expected = json.loads(manifest)["sha256"]
        if any(hashlib.sha256(data).hexdigest() != expected[name] for name, data in files.items()):
            return None  # a half-written or foreign entry: rebuild rather than trust it
        return self._install(key, files, manifest)

    def store(self, key: str, built: _Built, manifest: dict) -> Path:
        files = {
            "tokenizer.json": built.tokenizer.to_json().encode(),
            "train.npy": _npy_bytes(built.train),
            "val.npy": _npy_bytes(built.val),
        }
        manifest = manifest | {"sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        path = self._install(key, files, manifest_bytes)
        if self.remote is not None:
            self._upload(key, files, manifest_bytes)
        return path

    def _upload(self, key: str, files: dict[str, bytes], manifest: bytes) -> None:
        fs, prefix = s3_filesystem(), f"{self.remote}/{key}"
        for name, data in files.items():
            fs.pipe_file(f"{prefix}/{name}", data)
        fs.pipe_file(f"{prefix}/manifest.json", manifest)  # last: readers only trust entries that have one

    def _install(self, key: str, files: dict[str, bytes], manifest: bytes) -> Path:
        """Write into a private temporary directory, then rename it into place in one step."""
        final = self.local(key)
        temporary = self.local_root / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        temporary.mkdir(parents=True)
        for name, data in files.items():
            (temporary / name).write_bytes(data)
        (temporary / "manifest.json").write_bytes(manifest)
        try:
            os.rename(temporary, final)
        except OSError:  # another process installed the same entry first
            shutil.rmtree(temporary, ignore_errors=True)
            if not (final / "manifest.json").exists():
                raise
        return final


def cache_key(spec: DataSpec, train_source: Source, val_source: Optional[Source]) -> tuple[str, dict]:
    parts = {
        "format": DATA_FORMAT_VERSION,
        "train": train_source.fingerprint(),
        "validation": val_source.fingerprint() if val_source else None,
        "validation_tokens": spec.validation_tokens,
        "unique_tokens": spec.unique_tokens,
        "tokenizer": _tokenizer_key(spec.tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], parts


# ---------------------------------------------------------------------------------------------
# The prepared data


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the tokens' empirical unigram distribution: the loss of a model that
    only learnt token frequencies; a trained model should go well below it."""
    counts = np.bincount(np.asarray(tokens).ravel().astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclass
class PreparedData:
    """What a run trains and evaluates on.

    `pool` is the 1-D unique pool of exactly `unique_tokens` tokens; `train` is [N, seq_len], the
    pool's first N = floor(unique_tokens / seq_len) windows (what `packing: fixed` trains on), so the
    effective unique tokens are N × seq_len (`metadata["unique_tokens"]`); `val` is the 1-D
    validation token stream of exactly `validation_tokens` tokens.
    """

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    metadata: dict
    seed: int
    pool: Optional[np.ndarray] = None  # None: `train` is the pool
    packing: str = "fixed"

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def train_batches(self) -> "TrainBatches | RepackedBatches":
        if self.packing == "per-epoch":
            pool = self.train.ravel() if self.pool is None else self.pool
            return RepackedBatches(pool, self.tokenizer.eos_id, self.seq_len, self.seed)
        return TrainBatches(self.train, self.seed)

    def val_batches(self, batch_size: int, seq_len: Optional[int] = None) -> list[torch.Tensor]:
        return val_batches(self.val, batch_size, seq_len or self.seq_len)

    def choice_examples(self, n: int, k: int, context_tokens: int, continuation_tokens: int) -> list["ChoiceExample"]:
        return choice_examples(self.val, n, k, context_tokens, continuation_tokens, self.seed)


def prepare_data(data_spec: DataSpec, seed: int, cache_root: Path) -> PreparedData:
    """Read, tokenize and cache the data a spec asks for (see the module docstring).

    The cache lives in `data_spec.cache` (a local dir or s3:// prefix) when set, else in
    `cache_root`; with an S3 cache, `cache_root` keeps the local copy. Raises `DataError` (one
    line naming the spec field) on bad input. `metadata` holds: `unique_tokens` (effective, =
    `unique_sequences` × `seq_len`), `unique_tokens_requested`, `unique_sequences`, `seq_len`,
    `packing`, `validation_tokens`, `validation_bytes` (UTF-8 bytes of the text the validation
    tokens encode: see `text_bytes`; end-of-document tokens count 0), `validation_bytes_per_token`
    (their ratio: a loss of L nats per token is L / (bytes_per_token × ln 2) bits per byte),
    `source_fingerprint`, `validation_fingerprint`, `source_documents`, `pool_documents`,
    `validation_documents`, `tokenizer_training_documents` and `tokenizer_training_bytes` (the BPE's
    training text; 0 for other tokenizers), `unigram_entropy` (nats, of the N × seq_len training
    tokens of the fixed windows), `vocab_size`, `eos_id`, `mask_id`, `tokenizer_kind`, `cache_key`,
    `cache_dir`, `cache_hit`, `seconds`.
    """
    started = time.perf_counter()
    train_source = open_source(data_spec.train, "spec.data.train")
    val_source = open_source(data_spec.validation, "spec.data.validation") if data_spec.validation else None
    key, key_parts = cache_key(data_spec, train_source, val_source)
    cache = TokenCache(data_spec.cache or cache_root, Path(cache_root))
    with cache.lock(key):
        path = cache.find(key)
        hit = path is not None
        if not hit:
            built = _build(data_spec, train_source, val_source)
            path = cache.store(key, built, built.manifest | {"key": key_parts})
    manifest = json.loads((path / "manifest.json").read_text())
    tokenizer = Tokenizer.from_json((path / "tokenizer.json").read_text())
    pool = np.load(path / "train.npy", mmap_mode="r")
    val = np.load(path / "val.npy")
    n = data_spec.unique_tokens // data_spec.seq_len
    train = pool[: n * data_spec.seq_len].reshape(n, data_spec.seq_len)
    metadata = {
        key_: manifest[key_]
        for key_ in ("source_documents", "pool_documents", "validation_documents", "validation_bytes",
                     "vocab_size", "eos_id", "mask_id", "tokenizer_training_documents", "tokenizer_training_bytes")
    } | {
        "unique_tokens": n * data_spec.seq_len,
        "unique_tokens_requested": data_spec.unique_tokens,
        "unique_sequences": n,
        "seq_len": data_spec.seq_len,
        "packing": data_spec.packing,
        "validation_tokens": len(val),
        "validation_bytes_per_token": manifest["validation_bytes"] / len(val),
        "source": data_spec.train,
        "validation_source": data_spec.validation,
        "source_fingerprint": key_parts["train"],
        "validation_fingerprint": key_parts["validation"],
        "tokenizer_kind": data_spec.tokenizer.kind,
        "unigram_entropy": unigram_entropy(train),
        "cache_key": key,
        "cache_dir": str(path),
        "cache_hit": hit,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return PreparedData(tokenizer, train, val, metadata, seed, pool=pool, packing=data_spec.packing)


# ---------------------------------------------------------------------------------------------
# Epochs, steps and ranks


def sample_indices(step: int, micro_step: int, rank: int, world: int, micro_batch: int, global_batch: int) -> np.ndarray:
    """Global sample indices of one rank's micro-batch: s*G + (a*W + r)*m + [0, m).

    Over all ranks r < W and micro-steps a < G / (m*W) these are exactly the step's G samples
    s*G ... s*G+G-1, each taken once."""
    if global_batch % (micro_batch * world):
        raise ValueError(f"global batch {global_batch} is not divisible by micro batch {micro_batch} x world {world}")
    accumulation = global_batch // (micro_batch * world)
    if not (0 <= rank < world and 0 <= micro_step < accumulation and step >= 0):
        raise ValueError(f"step {step}, micro-step {micro_step} (of {accumulation}), rank {rank} (of {world}) is out of range")
    start = step * global_batch + (micro_step * world + rank) * micro_batch
    return np.arange(start, start + micro_batch, dtype=np.int64)


class EpochSampler:
    """Maps a global sample index to a unique sequence: epoch e = k // N is the permutation
    perm_e, seeded by (seed, e) alone, and position k % N picks perm_e's entry. Every epoch is one
    full pass over the N sequences, in a fresh order."""

    def __init__(self, num_sequences: int, seed: int):
        if num_sequences < 1:
            raise ValueError("an epoch needs at least one sequence")
        self.num_sequences, self.seed = num_sequences, seed
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a step spans at most two epochs unless G > N
                self._permutations.pop(next(iter(self._permutations)))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, DATA_ORDER_STREAM])))
            self._permutations[epoch] = rng.permutation(self.num_sequences)
        return self._permutations[epoch]

    def sequence_ids(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.int64)
        epochs, positions = np.divmod(samples, self.num_sequences)
        out = np.empty_like(samples)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self.permutation(int(epoch))[positions[where]]
        return out

    def epoch_at(self, samples_consumed: int) -> float:
        """Passes over the unique pool after `samples_consumed` samples: a real number."""
        return samples_consumed / self.num_sequences


def pool_fingerprint(sequences: np.ndarray, *extra: object) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{sequences.shape}{sequences.dtype}{''.join(map(str, extra))}".encode())
    h.update(np.ascontiguousarray(sequences).tobytes())
    return h.hexdigest()


class _Batches:
    """Training batches: a pure function of (seed, step, slice) given the data, plus the counter of
    samples consumed that checkpoints carry. Subclasses give `packing`, `num_sequences` (windows per
    epoch), `_pool_fingerprint()` and `rows(samples)`."""

    packing: str
    num_sequences: int

    def __init__(self, seed: int, num_sequences: int):
        self.seed, self.num_sequences = seed, num_sequences
        self.sampler = EpochSampler(num_sequences, seed)
        self.samples_consumed = 0
        self._fingerprint: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self._pool_fingerprint()
        return self._fingerprint

    def _pool_fingerprint(self) -> str:
        raise NotImplementedError

    def rows(self, samples: np.ndarray) -> np.ndarray:
        """The [len(samples), seq_len] tokens of global samples `samples`."""
        raise NotImplementedError

    def indices_for(self, step: int, micro_step: int, rank: int, world: int, micro_batch: int, global_batch: int) -> np.ndarray:
        """The global sample indices of this rank's micro-batch (see `sample_indices`)."""
        return sample_indices(step, micro_step, rank, world, micro_batch, global_batch)

    def batch(self, step: int, micro_step: int, rank: int, world: int, micro_batch: int, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens LongTensor[m, seq_len], global sample index LongTensor[m]) of this rank's micro-batch."""
        samples = self.indices_for(step, micro_step, rank, world, micro_batch, global_batch)
        return torch.from_numpy(self.rows(samples).astype(np.int64)), torch.from_numpy(samples)

    def step_done(self, step: int, global_batch: int) -> None:
        """Record that optimizer step `step` (0-based) finished: its samples are consumed."""
        self.samples_consumed = (step + 1) * global_batch

    def epoch_at(self, samples_consumed: Optional[int] = None) -> float:
        return self.sampler.epoch_at(self.samples_consumed if samples_consumed is None else samples_consumed)

    def resume_step(self, global_batch: int) -> int:
        """The next step to run after `load_state_dict`, for a global batch of `global_batch`."""
        if self.samples_consumed % global_batch:
            raise DataError(
                f"spec.batch: the checkpoint consumed {self.samples_consumed} samples, not a whole number of "
                f"steps of {global_batch} sequences; resume with the global batch it was trained with"
            )
        return self.samples_consumed // global_batch

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed, "packing": self.packing,
                "num_sequences": self.num_sequences, "pool_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        packing = state.get("packing", "fixed")  # checkpoints from before per-epoch packing were fixed
        if packing != self.packing:
            raise DataError(f"spec.data.packing: the checkpoint was trained with packing {packing}, not {self.packing}")
        if state["pool_fingerprint"] != self.fingerprint:
            raise DataError(
                f"spec.data: the checkpoint was trained on other data (pool {state['pool_fingerprint']}, "
                f"now {self.fingerprint}); resume with the spec.data it was trained with"
            )
        if state["seed"] != self.seed:
            raise DataError(f"spec.seed: the checkpoint was trained with seed {state['seed']}, not {self.seed}")
        self.samples_consumed = int(state["samples_consumed"])


class TrainBatches(_Batches):
    """packing: fixed. The unique sequences [N, seq_len], cut from the pool once; sample k is
    sequence perm_e[k % N] of epoch e = k // N."""

    packing = "fixed"

    def __init__(self, sequences: np.ndarray, seed: int):
        super().__init__(seed, len(sequences))
        self.sequences = sequences

    def _pool_fingerprint(self) -> str:
        return pool_fingerprint(self.sequences)

    def rows(self, samples: np.ndarray) -> np.ndarray:
        return self.sequences[self.sampler.sequence_ids(samples)]


class RepackedBatches(_Batches):
    """packing: per-epoch (Megatron). Epoch e's stream is the pool's whole documents (each ending in
    `eos_id`) in a permutation keyed by (seed, e, PACKING_STREAM), then the pool's cut last document
    if it has one; it is cut into N = len(pool) // seq_len windows (the last len(pool) % seq_len tokens
    of the stream are left out), and sample k is window perm_e[k % N] of epoch e = k // N (the
    `EpochSampler` order, as for fixed packing). A window's tokens are gathered from the pool through
    the documents' offsets: memory stays that of the pool plus O(documents) per epoch."""

    packing = "per-epoch"

    def __init__(self, pool: np.ndarray, eos_id: int, seq_len: int, seed: int):
        super().__init__(seed, len(pool) // seq_len)
        self.pool, self.eos_id, self.seq_len = np.asarray(pool), eos_id, seq_len  # a memory map stays one
        ends = np.flatnonzero(self.pool == eos_id) + 1
        self.whole_documents = len(ends)
        if not len(ends) or ends[-1] != len(pool):
            ends = np.append(ends, len(pool))  # the cut last document: no end-of-document
        self.doc_starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        self.doc_lengths = (ends - self.doc_starts).astype(np.int64)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _pool_fingerprint(self) -> str:
        return pool_fingerprint(self.pool, "per-epoch", self.seq_len, self.eos_id)

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, start of each of them in the epoch's stream) of epoch `epoch`."""
        if epoch not in self._layouts:
            if len(self._layouts) >= 2:  # a step spans at most two epochs unless G > N
                self._layouts.pop(next(iter(self._layouts)))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, PACKING_STREAM])))
            order = np.concatenate([rng.permutation(self.whole_documents),
                                    np.arange(self.whole_documents, len(self.doc_starts))])
            starts = np.concatenate([[0], np.cumsum(self.doc_lengths[order])[:-1]])
            self._layouts[epoch] = order, starts
        return self._layouts[epoch]

    def windows(self, epoch: int, window_ids: np.ndarray) -> np.ndarray:
        """Windows `window_ids` of epoch `epoch`'s stream: [len(window_ids), seq_len] tokens."""
        order, starts = self.layout(epoch)
        positions = np.asarray(window_ids, dtype=np.int64)[:, None] * self.seq_len + np.arange(self.seq_len)
        doc = np.searchsorted(starts, positions, side="right") - 1
        return self.pool[self.doc_starts[order[doc]] + positions - starts[doc]]

    def rows(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.int64)
        epochs, window_ids = samples // self.num_sequences, self.sampler.sequence_ids(samples)
        out = np.empty((len(samples), self.seq_len), dtype=self.pool.dtype)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self.windows(int(epoch), window_ids[where])
        return out


# ---------------------------------------------------------------------------------------------
# Validation


def val_batches(val_tokens: np.ndarray, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """The validation stream cut into floor(len / seq_len) rows of seq_len tokens, in order, in
    batches of `batch_size` rows (the last may be smaller): fixed, the same on every call."""
    rows = len(val_tokens) // seq_len
    if rows == 0:
        raise DataError(f"spec.data.validation_tokens: {len(val_tokens)} is less than one sequence (seq_len={seq_len})")
    table = torch.from_numpy(np.asarray(val_tokens[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len))
    return list(table.split(batch_size))


class ChoiceExample(NamedTuple):
    context: list[int]
    candidates: list[list[int]]  # k continuations: the true next chunk and k-1 distractors
    answer: int  # index of the true continuation in `candidates`


def choice_examples(val_tokens: np.ndarray, n: int, k: int, context_tokens: int, continuation_tokens: int, seed: int) -> list[ChoiceExample]:
    """A continuation-choice task from validation text: the validation stream is cut into windows
    of context + continuation tokens; n windows give an example each, whose distractors are the
    continuations of other windows (all k candidates distinct). Deterministic in `seed`."""
    window = context_tokens + continuation_tokens
    windows = len(val_tokens) // window
    if n == 0:
        return []
    if windows < n or windows < k:
        raise DataError(
            f"spec.eval.choice_task.examples: {n} examples of {window} tokens with {k} choices need at least "
            f"{max(n, k)} windows but the validation set has {windows}; raise spec.data.validation_tokens"
        )
    table = np.asarray(val_tokens[: windows * window], dtype=np.int64).reshape(windows, window)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, CHOICE_STREAM])))
    examples = []
    for w in rng.permutation(windows)[:n]:
        true = table[w, context_tokens:].tolist()
        distractors, seen = [], {tuple(true)}
        for other in rng.permutation(windows):
            candidate = table[other, context_tokens:].tolist()
            if other != w and tuple(candidate) not in seen:
                seen.add(tuple(candidate))
                distractors.append(candidate)
                if len(distractors) == k - 1:
                    break
        if len(distractors) < k - 1:
            raise DataError(f"spec.eval.choice_task.choices: the validation set has too few distinct continuations for {k} choices")
        answer = int(rng.integers(k))
        examples.append(ChoiceExample(table[w, :context_tokens].tolist(), distractors[:answer] + [true] + distractors[answer:], answer))
    return examples
