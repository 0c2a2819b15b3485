"""Training objectives: masked diffusion (as MegaDLMs and SMDM) and next-token prediction.

Randomness is keyed by (seed, step, global sample index), never by rank: one process and N processes
draw identical times, masks and lengths for the same sample, and a resumed run redraws them exactly.
The data pipeline guarantees global sample index = step * global_batch + j, j in [0, global_batch).

Draws come from a counter-based generator (splitmix64 over numpy uint64): the bits at a position are a
pure function of (seed, step, sample index, stream, position), computed for a whole micro-batch at once,
so a sample's draws do not depend on which samples share its micro-batch, and a prefix of a row is the
row drawn at that shorter length.

Both losses are the mean over the micro-batch's rows, so averaging micro-batches and ranks gives the
global loss.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from dlmctl.spec.sections import Arm, AutoregressiveSpec, DiffusionSpec, ObjectiveSpec

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's counter increment
CHUNK_BYTES = 1 << 18  # uint64 scratch per chunk of rows in keyed_uniforms


def keyed_generator(*key) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `key` (ints and strings): counter-based randomness."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array (numpy arrays wrap modulo 2^64)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


@lru_cache(maxsize=None)
def _stream_constant(stream: str) -> int:
    return int.from_bytes(hashlib.blake2b(stream.encode(), digest_size=8).digest(), "little")


def _row_keys(seed: int, step: int, sample_index, stream: str) -> np.ndarray:
    """One uint64 key per sample: the mix chained over (stream, seed, step, sample index)."""
    head = np.array([_stream_constant(stream)], dtype=np.uint64)
    for part in (seed, step):
        head = _mix64(head ^ np.uint64(part & MASK64))
    index = torch.as_tensor(sample_index).cpu().numpy().astype(np.int64).astype(np.uint64)
    return _mix64(head ^ index)


def _splitmix(keys: np.ndarray, count: int) -> np.ndarray:
    """[B, count] uint64: positions 0..count-1 of the splitmix64 sequence that starts at each key."""
    return _mix64(keys[:, None] + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(GOLDEN_GAMMA))


def keyed_bits(seed: int, step: int, sample_index, stream: str, count: int) -> np.ndarray:
    """[B, count] uint64 random bits keyed by (seed, step, sample index, stream, position)."""
    return _splitmix(_row_keys(seed, step, sample_index, stream), count)


def keyed_uniforms(seed: int, step: int, sample_index, stream: str, count: int,
                   below: torch.Tensor | None = None) -> torch.Tensor:
    """[B, count] float64 uniforms u on [0, 1) with 53 random bits, keyed as `keyed_bits`; or, given
    `below` ([B] probabilities), the Bernoulli draws u < below[row] as bool, without materialising u.
    Rows are mixed a few at a time: a whole micro-batch of uint64 scratch would run at memory speed."""
    keys = _row_keys(seed, step, sample_index, stream)
    out = np.empty((len(keys), count), dtype=np.float64 if below is None else np.bool_)
    if below is not None:
        threshold = below.cpu().double().numpy()[:, None] * 2.0 ** 53  # u < p  <=>  (bits >> 11) < p 2^53
    rows = max(1, CHUNK_BYTES // (8 * max(count, 1)))
    for start in range(0, len(keys), rows):
        chunk = slice(start, start + rows)
        mantissa = _splitmix(keys[chunk], count) >> np.uint64(11)
        if below is None:
            np.multiply(mantissa, 2.0 ** -53, out=out[chunk])
        else:
            np.less(mantissa, threshold[chunk], out=out[chunk])
    return torch.from_numpy(out)


def as_arm(arm: Arm | str) -> Arm:
    """An Arm from its value or short name ('diffusion'/'dlm', 'autoregressive'/'ar')."""
    by_short_name = {a.short: a for a in Arm}
    return by_short_name[arm] if arm in by_short_name else Arm(arm)


def mask_probability(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """p(t): linear p = t. (Another schedule would also need the ELBO weight p'(t)/p(t) in the loss.)"""
    if schedule == "linear":
        return t
    raise ValueError(f"unknown mask schedule {schedule!r}")


def sequence_lengths(seed: int, step: int, sample_index: torch.Tensor, seq_len: int,
                     random_length_fraction: float) -> torch.Tensor:
    """Each sample's training length, [B] int64 on the CPU: seq_len, or with probability
    `random_length_fraction` a length drawn uniformly from {1..seq_len} (MegaDLMs' --difflm-varilen-prob,
    per sequence rather than per micro-batch so the cut samples do not depend on the batch layout)."""
    if random_length_fraction <= 0:
        return torch.full((len(sample_index),), seq_len, dtype=torch.int64)
    bits = keyed_bits(seed, step, sample_index, "random-length", 2)
    is_cut = (bits[:, 0] >> np.uint64(11)) * 2.0 ** -53 < random_length_fraction
    drawn = 1 + (bits[:, 1] % np.uint64(seq_len)).astype(np.int64)
    return torch.from_numpy(np.where(is_cut, drawn, seq_len))


def diffusion_mask(
    tokens: torch.Tensor, sample_index: torch.Tensor, step: int, seed: int, cfg: DiffusionSpec, mask_id: int,
    global_batch: int, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process for a micro-batch: (noisy tokens, masked [B, L] bool, t [B], p(t) [B]).

    Per row: t ~ U(eps, 1) (or stratified across the global batch when `antithetic`), each token masked
    independently with probability p(t), and a row left without a masked token gets one position masked
    at random. `lengths` [B] (default: all L) cuts rows: positions >= a row's length are never masked.
    """
    B, L = tokens.shape
    sample_index = sample_index.cpu()
    t = keyed_uniforms(seed, step, sample_index, "diffusion-time", 1)[:, 0]
    if cfg.antithetic:
        offset = keyed_uniforms(seed, step, torch.zeros(1, dtype=torch.int64), "antithetic", 1)[0, 0]
        t = (offset + (sample_index % global_batch).double() / global_batch) % 1.0
    t = cfg.eps + (1 - cfg.eps) * t
    p = mask_probability(t, cfg.mask_schedule)
    masked = keyed_uniforms(seed, step, sample_index, "diffusion-mask", L, below=p).numpy()
    lengths = np.full(B, L) if lengths is None else lengths.cpu().numpy()
    if (lengths < L).any():
        masked &= np.arange(L) < lengths[:, None]
    unmasked = np.flatnonzero(~masked.any(1))
    if len(unmasked):
        bits = keyed_bits(seed, step, sample_index[unmasked], "diffusion-fallback", 1)[:, 0]
        masked[unmasked, (bits % lengths[unmasked].astype(np.uint64)).astype(np.int64)] = True
    # non_blocking: a copy from pageable memory is staged at once, and the host need not wait for the device
    masked = torch.from_numpy(masked).to(tokens.device, non_blocking=True)
    noisy = torch.where(masked, mask_id, tokens)
    return noisy, masked, t.to(tokens.device, non_blocking=True), p.to(tokens.device, non_blocking=True)


def diffusion_loss(
    model, tokens: torch.Tensor, sample_index: torch.Tensor, step: int, seed: int, cfg: DiffusionSpec,
    mask_id: int, global_batch: int,
) -> tuple[torch.Tensor, dict]:
    """Masked-diffusion loss: per row, the sum over masked tokens of CE / w divided by the row's length,
    averaged over rows; no label shift. w is the row's realized mask ratio (`loss_weight: realized`) or
    p(t) (`sampled`). A row cut to length l (`random_length_fraction`) is trained as if it were its first
    l tokens: later positions are neither masked, nor in the loss, nor visible as attention keys."""
    B, L = tokens.shape
    lengths = sequence_lengths(seed, step, sample_index, L, cfg.random_length_fraction)
    noisy, masked, t, p = diffusion_mask(tokens, sample_index, step, seed, cfg, mask_id, global_batch, lengths)
    n_cut = int((lengths < L).sum())
    row_length = lengths.to(tokens.device, non_blocking=True)
    # The key-padding mask only when a row is cut: the full-length path keeps SDPA's unmasked kernels.
    logits = model(noisy, causal=False, lengths=row_length) if n_cut else model(noisy, causal=False)
    row_length = row_length.float()
    realized = masked.sum(1, dtype=torch.float32) / row_length
    weight = realized if cfg.loss_weight == "realized" else p.float()
    # CE at every position, then zero weight on unmasked ones: the same work as the AR loss, no host sync.
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view_as(tokens)
    loss = ((ce * masked / weight[:, None]).sum(1) / row_length).mean()
    stats = {"mask_ratio": realized.mean().detach(), "t": t.float().mean().detach(), "seq_len": L,
             "cut_rows": n_cut}
    return loss, stats


def ar_input_mask(tokens: torch.Tensor, sample_index: torch.Tensor, step: int, seed: int, ratio: float) -> torch.Tensor:
    """Which input positions the input-masking ablation replaces by [MASK]: Bernoulli(ratio) per token."""
    ratios = torch.full((len(sample_index),), ratio, dtype=torch.float64)
    return keyed_uniforms(seed, step, sample_index, "ar-input-mask", tokens.shape[1], below=ratios).to(
        tokens.device, non_blocking=True)


def ar_loss(
    model, tokens: torch.Tensor, sample_index: torch.Tensor, step: int, seed: int, cfg: AutoregressiveSpec,
    mask_id: int,
) -> tuple[torch.Tensor, dict]:
    """Next-token CE with causal attention: tokens[:, :-1] predict tokens[:, 1:]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    stats = {"seq_len": tokens.shape[1]}
    if cfg.input_mask_ratio > 0:
        masked = ar_input_mask(inputs, sample_index, step, seed, cfg.input_mask_ratio)
        inputs = torch.where(masked, torch.full_like(inputs, mask_id), inputs)
        stats["input_mask_ratio"] = masked.float().mean().detach()
    logits = model(inputs, causal=True)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss, stats


def objective_loss(
    arm: Arm | str, model, tokens: torch.Tensor, sample_index: torch.Tensor, step: int, seed: int,
    objective: ObjectiveSpec, mask_id: int, global_batch: int,
) -> tuple[torch.Tensor, dict]:
    """The arm's loss for one micro-batch, plus the model variant's auxiliary loss (see with_auxiliary_loss)."""
    if as_arm(arm) is Arm.diffusion:
        loss, stats = diffusion_loss(model, tokens, sample_index, step, seed, objective.diffusion, mask_id, global_batch)
    else:
        loss, stats = ar_loss(model, tokens, sample_index, step, seed, objective.autoregressive, mask_id)
    return with_auxiliary_loss(model, loss, stats)


def with_auxiliary_loss(model, loss: torch.Tensor, stats: dict) -> tuple[torch.Tensor, dict]:
    """`loss` plus the auxiliary loss the model variant collected in the forward pass just run (a mixture of
    experts' load balancing and router z-loss; the dense model has none), with its parts in `stats`
    (`aux_loss` the weighted sum). `model` may be wrapped (a DeepSpeed engine holds it as `.module`)."""
    auxiliary = getattr(getattr(model, "module", model), "auxiliary_loss", lambda: None)()
    if auxiliary is None:
        return loss, stats
    aux, parts = auxiliary
    return loss + aux, {**stats, **parts, "aux_loss": aux.detach()}
