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
   never part of that text (see `data_plan._hold_out_validation`).
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

Each document is tokenized on its own, so the pool for any `unique_tokens` is the first
`unique_tokens` tokens of one stream: the training documents in hash order, each followed by eos.
The cache (`token_cache.py`) keeps that stream per (source content fingerprints, validation source,
validation_tokens, tokenizer config with its training bytes): not unique_tokens, seq_len, packing
nor seed, so every arm, seed, sequence length, packing and unique-token budget of a sweep shares one
entry. An entry is a *plan* (a compact index of the candidate documents, the tokenizer, the
validation tokens, the shard boundaries; `data_plan.py`), built by streaming the source once, and
*shards* of the stream, each tokenized from its documents' byte ranges. `prepare_data` builds, or
fetches from the S3 mirror, the plan and then only the shards that cover the pool, and memory-maps
the pool; `prepare_shards` (`python -m dlmctl.trainer prepare-data`) builds every shard, split over
workers. Memory stays bounded by a shard's chunk, the document index and the largest non-.jsonl
file, whatever the pool's size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dlmctl.spec.sections import DataSpec

from .corpus import DataError, Source, open_source
from .data_plan import COPY_CHUNK, Plan, build_plan, build_shard, tokenizer_key
from .eval_data import ChoiceExample, choice_examples, val_batches
from .sampler import RepackedBatches, TrainBatches
from .token_cache import Entry, TokenCache, shard_files
from .tokenizer import Tokenizer

__all__ = ["DataError", "PreparedData", "Tokenizer", "prepare_data", "prepare_shards", "unigram_entropy"]

DATA_FORMAT_VERSION = 3  # bump when what a cache entry holds, or how it is chosen, changes

log = logging.getLogger("dlmctl.trainer")


# ---------------------------------------------------------------------------------------------
# The cache entry of a spec


def cache_key(spec: DataSpec, train_source: Source, val_source: Optional[Source]) -> tuple[str, dict]:
    parts = {
        "format": DATA_FORMAT_VERSION,
        "train": train_source.fingerprint(),
        "validation": val_source.fingerprint() if val_source else None,
        "validation_tokens": spec.validation_tokens,
        "tokenizer": tokenizer_key(spec.tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], parts


@dataclass
class Sources:
    spec: DataSpec
    train: Source
    validation: Optional[Source]
    key: str
    key_parts: dict

    @classmethod
    def of(cls, spec: DataSpec) -> "Sources":
        train = open_source(spec.train, "spec.data.train")
        validation = open_source(spec.validation, "spec.data.validation") if spec.validation else None
        return cls(spec, train, validation, *cache_key(spec, train, validation))


def ensure_plan(entry: Entry, sources: Sources) -> tuple[Plan, bool]:
    """(the entry's plan, whether it was built here): fetched, or built and stored."""
    plan = entry.load_plan()
    if plan is not None:
        return plan, False
    entry.store_plan(build_plan(sources.spec, sources.train, sources.validation), sources.key_parts)
    return entry.load_plan(), True


def ensure_shard(entry: Entry, plan: Plan, source: Source, j: int, keep_local: bool = True, fetch: bool = True) -> tuple[dict, bool]:
    """(shard j's manifest, whether it was built here): fetched (when `fetch`), or built and stored."""
    manifest = entry.fetch_shard(j) if fetch else entry.shard_manifest(j)
    if manifest is not None:
        return manifest, False
    scratch = entry.scratch()
    try:
        manifest = build_shard(plan, source, j, scratch)
        entry.store_shard(j, scratch, manifest, keep_local=keep_local)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest, True


def finish_if_complete(entry: Entry, plan: Plan, key_parts: dict) -> Optional[dict]:
    """The completion manifest, written when every shard has its manifest; None while one is missing."""
    done = entry.completion()
    if done is not None:
        return done
    manifests = [entry.shard_manifest(j) for j in range(plan.num_shards)]
    return None if any(m is None for m in manifests) else entry.write_completion(manifests, key_parts)


def prepare_shards(data_spec: DataSpec, cache_root: Path, worker: int = 0, workers: int = 1,
                   plan_wait_seconds: float = 6 * 3600) -> dict:
    """Worker `worker` of `workers` of the data-preparation job: worker 0 builds the plan when it is
    absent, the others wait for it; each then builds the missing shards j ≡ worker (mod workers), of
    the whole source; whoever then finds every shard complete writes the completion manifest. Returns
    {"plan_built", "shards_built", "shards", "complete"}."""
    import tenacity

    if not 0 <= worker < workers:
        raise DataError(f"--worker: {worker} is not in 0..{workers - 1}")
    sources = Sources.of(data_spec)
    cache = TokenCache(data_spec.cache or cache_root, Path(cache_root))
    entry = cache.entry(sources.key)
    plan_built = False
    if worker == 0:
        with entry.lock():
            plan, plan_built = ensure_plan(entry, sources)
    else:
        waiting = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda found: found is None),
            wait=tenacity.wait_exponential(multiplier=1, min=1, max=60),
            stop=tenacity.stop_after_delay(plan_wait_seconds), retry_error_callback=lambda state: None)
        plan = waiting(entry.load_plan)
        if plan is None:
            raise RuntimeError(f"the plan of cache entry {sources.key} did not appear within {plan_wait_seconds:.0f} s")
    built = 0
    keep_local = cache.remote is None
    for j in range(worker, plan.num_shards, workers):
        with entry.lock():
            _, was_built = ensure_shard(entry, plan, sources.train, j, keep_local=keep_local, fetch=False)
        built += was_built
        if was_built:
            log.info("data: shard %d of %d built", j + 1, plan.num_shards)
    complete = finish_if_complete(entry, plan, sources.key_parts)
    return {"cache_key": sources.key, "plan_built": plan_built, "shards_built": built, "shards": plan.num_shards,
            "complete": complete is not None}


# ---------------------------------------------------------------------------------------------
# The prepared data


def entropy_of_counts(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def token_counts(tokens: np.ndarray, vocab_size: int = 0) -> np.ndarray:
    """Unigram counts of `tokens`, a memory map read in bounded chunks."""
    flat = np.asarray(tokens).reshape(-1)
    counts = np.zeros(max(vocab_size, int(flat.max()) + 1 if len(flat) else 0), np.int64)
    for start in range(0, len(flat), COPY_CHUNK):
        counts += np.bincount(flat[start:start + COPY_CHUNK], minlength=len(counts))
    return counts


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the tokens' empirical unigram distribution: the loss of a model that
    only learnt token frequencies; a trained model should go well below it."""
    return entropy_of_counts(token_counts(tokens))


@dataclass
class PreparedData:
    """What a run trains and evaluates on.

    `pool` is the 1-D unique pool of exactly `unique_tokens` tokens; `train` is [N, seq_len], the
    pool's first N = floor(unique_tokens / seq_len) windows (what `packing: fixed` trains on), so the
    effective unique tokens are N × seq_len (`metadata["unique_tokens"]`); `val` is the 1-D
    validation token stream of exactly `validation_tokens` tokens. `document_ends` (when known) is
    the end of each of the pool's documents in the pool, the cut last one ending at its end.
    """

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    metadata: dict
    seed: int
    pool: Optional[np.ndarray] = None  # None: `train` is the pool
    packing: str = "fixed"
    document_ends: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def train_batches(self) -> "TrainBatches | RepackedBatches":
        if self.packing == "per-epoch":
            pool = self.train.ravel() if self.pool is None else self.pool
            return RepackedBatches(pool, self.tokenizer.eos_id, self.seq_len, self.seed, document_ends=self.document_ends)
        return TrainBatches(self.train, self.seed)

    def val_batches(self, batch_size: int, seq_len: Optional[int] = None) -> list[torch.Tensor]:
        return val_batches(self.val, batch_size, seq_len or self.seq_len)

    def choice_examples(self, n: int, k: int, context_tokens: int, continuation_tokens: int) -> list["ChoiceExample"]:
        return choice_examples(self.val, n, k, context_tokens, continuation_tokens, self.seed)


def prepare_data(data_spec: DataSpec, seed: int, cache_root: Path) -> PreparedData:
    """Read, tokenize and cache the data a spec asks for (see the module docstring).

    The cache lives in `data_spec.cache` (a local dir or s3:// prefix) when set, else in
    `cache_root`; with an S3 cache, `cache_root` keeps the local copy. Builds (or fetches) the plan,
    then the shards in order until they cover `unique_tokens`, appending each to the local stream
    that the pool memory-maps. Raises `DataError` (one line naming the spec field) on bad input.
    `metadata` holds: `unique_tokens` (effective, = `unique_sequences` × `seq_len`),
    `unique_tokens_requested`, `unique_sequences`, `seq_len`, `packing`, `validation_tokens`,
    `validation_bytes` (UTF-8 bytes of the text the validation tokens encode: see
    `data_plan.text_bytes`; end-of-document tokens count 0), `validation_bytes_per_token` (their
    ratio: a loss of L nats per token is L / (bytes_per_token × ln 2) bits per byte),
    `source_fingerprint`, `validation_fingerprint`, `source_documents`, `pool_documents`,
    `validation_documents`, `tokenizer_training_documents` and `tokenizer_training_bytes` (the BPE's
    training text; 0 for other tokenizers), `unigram_entropy` (nats, of the N × seq_len training
    tokens of the fixed windows), `vocab_size`, `eos_id`, `mask_id`, `tokenizer_kind`, `cache_key`,
    `cache_dir`, `cache_hit` (nothing was tokenized), `shards` (of the stream, used / all), `seconds`.
    """
    started = time.perf_counter()
    U = data_spec.unique_tokens
    sources = Sources.of(data_spec)
    entry = TokenCache(data_spec.cache or cache_root, Path(cache_root)).entry(sources.key)
    with entry.lock():
        plan, built = ensure_plan(entry, sources)
        dtype, ends = plan.dtype, entry.stream_state()["ends"]
        while (ends[-1] if ends else 0) < U and len(ends) < plan.num_shards:
            j = len(ends)
            manifest, was_built = ensure_shard(entry, plan, sources.train, j)
            if not entry.append_to_stream(j, manifest, dtype):  # this machine's copy is damaged: rebuild it
                entry.forget_shard(j)
                manifest, was_built = ensure_shard(entry, plan, sources.train, j)
                if not entry.append_to_stream(j, manifest, dtype):
                    raise RuntimeError(f"shard {j} of cache entry {sources.key} does not match its manifest")
            built |= was_built
            ends = entry.stream_state()["ends"]
        if len(ends) == plan.num_shards:
            finish_if_complete(entry, plan, sources.key_parts)
    held = ends[-1] if ends else 0
    if held < U:
        held_out = "" if data_spec.validation else f" after holding out {data_spec.validation_tokens:,} validation tokens"
        raise DataError(
            f"spec.data.unique_tokens: {U:,} tokens asked but {data_spec.train} has only {held:,} training tokens{held_out}"
        )
    stats = plan.stats
    pool = entry.stream(U, dtype)
    n = U // data_spec.seq_len
    train = pool[: n * data_spec.seq_len].reshape(n, data_spec.seq_len)
    shards_used = int(np.searchsorted(ends, U)) + 1  # shards 0 .. shards_used - 1 hold the pool
    document_ends = _document_ends(entry, ends[:shards_used], U)
    metadata = {key_: stats[key_] for key_ in ("source_documents", "validation_documents", "validation_bytes", "vocab_size",
                                               "eos_id", "mask_id", "tokenizer_training_documents", "tokenizer_training_bytes")} | {
        "pool_documents": len(document_ends),
        "unique_tokens": n * data_spec.seq_len,
        "unique_tokens_requested": U,
        "unique_sequences": n,
        "seq_len": data_spec.seq_len,
        "packing": data_spec.packing,
        "validation_tokens": len(plan.val),
        "validation_bytes_per_token": stats["validation_bytes"] / len(plan.val),
        "source": data_spec.train,
        "validation_source": data_spec.validation,
        "source_fingerprint": sources.key_parts["train"],
        "validation_fingerprint": sources.key_parts["validation"],
        "tokenizer_kind": data_spec.tokenizer.kind,
        "unigram_entropy": entropy_of_counts(_prefix_counts(entry, pool, ends, n * data_spec.seq_len, plan.tokenizer.vocab_size)),
        "cache_key": sources.key,
        "cache_dir": str(entry.root),
        "cache_hit": not built,
        "shards": f"{shards_used}/{plan.num_shards}",
        "seconds": round(time.perf_counter() - started, 3),
    }
    return PreparedData(plan.tokenizer, train, np.asarray(plan.val), metadata, seed, pool=pool,
                        packing=data_spec.packing, document_ends=document_ends)


def _document_ends(entry: Entry, shard_ends: list[int], length: int) -> np.ndarray:
    """End of each document of the pool's first `length` tokens, from the shards' stored offsets; the
    cut last document ends at `length`."""
    parts, base = [], 0
    for j, end in enumerate(shard_ends):
        parts.append(base + np.load(entry.path(shard_files(j)["documents"])))
        base = end
    ends = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    whole = ends[: np.searchsorted(ends, length, side="right")]
    return whole if len(whole) and whole[-1] == length else np.append(whole, length).astype(np.int64)


def _prefix_counts(entry: Entry, pool: np.ndarray, shard_ends: list[int], length: int, vocab_size: int) -> np.ndarray:
    """Unigram counts of the pool's first `length` tokens: the stored counts of the shards wholly inside,
    the rest (less than a shard) counted from the memory map."""
    counts, base = np.zeros(vocab_size, np.int64), 0
    for j, end in enumerate(shard_ends):
        if end > length:
            break
        counts += np.load(entry.path(shard_files(j)["counts"]))
        base = end
    return counts + token_counts(pool[base:length], vocab_size)
