"""Epochs, steps and ranks: which sequences a rank trains on at a micro-step (see `data.py`, point 6: sample k of
the run is window perm_e[k mod N] of epoch e = k div N, keyed by the seed and the epoch, never by the rank),
for the fixed windows and for the windows re-packed every epoch."""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch

from .corpus import DataError
from .data_plan import COPY_CHUNK

DATA_ORDER_STREAM = 0x64617461  # "data": keeps the data-order RNG apart from other users of the seed
PACKING_STREAM = 0x7061636B  # "pack": the per-epoch document order


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
    """A hash of the tokens (read in bounded chunks: a memory map is never copied whole) and `extra`."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{sequences.shape}{sequences.dtype}{''.join(map(str, extra))}".encode())
    flat = np.asarray(sequences).reshape(-1)  # a view for a contiguous array (the pool's memory map)
    for start in range(0, len(flat), COPY_CHUNK):
        h.update(np.ascontiguousarray(flat[start:start + COPY_CHUNK]).data)
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
    the documents' offsets: memory stays that of the pool plus O(documents) per epoch. The offsets are
    `document_ends` when given (the cache stores them per shard), else found by scanning for eos."""

    packing = "per-epoch"

    def __init__(self, pool: np.ndarray, eos_id: int, seq_len: int, seed: int, document_ends: Optional[np.ndarray] = None):
        super().__init__(seed, len(pool) // seq_len)
        self.pool, self.eos_id, self.seq_len = np.asarray(pool), eos_id, seq_len  # a memory map stays one
        if document_ends is None:
            ends = np.concatenate([np.flatnonzero(self.pool[i:i + COPY_CHUNK] == eos_id) + i + 1
                                   for i in range(0, len(self.pool), COPY_CHUNK)] or [np.zeros(0, np.int64)])
            if not len(ends) or ends[-1] != len(pool):
                ends = np.append(ends, len(pool))  # the cut last document: no end-of-document
        else:
            ends = np.asarray(document_ends, dtype=np.int64)
        self.whole_documents = len(ends) if len(pool) and self.pool[len(pool) - 1] == eos_id else len(ends) - 1
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


