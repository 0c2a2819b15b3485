"""Training objectives: masked diffusion (as MegaDLMs and SMDM) and next-token prediction.

Randomness is keyed by (seed, step, global sample index), never by rank: one process and N processes
draw identical times and masks for the same sample, and a resumed run redraws them exactly. The data
pipeline guarantees global sample index = step * global_batch + j, j in [0, global_batch).

Both losses are the mean over the micro-batch, so averaging micro-batches and ranks gives the global loss.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from dlmctl.spec.sections import Arm, AutoregressiveSpec, DiffusionSpec, ObjectiveSpec


def keyed_generator(*key) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `key` (ints and strings): counter-based randomness."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def as_arm(arm: Arm | str) -> Arm:
    """An Arm from its value or short name ('diffusion'/'dlm', 'autoregressive'/'ar')."""
    short = {"dlm": Arm.diffusion, "ar": Arm.autoregressive}
    return short[arm] if arm in short else Arm(arm)


def mask_probability(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """p(t): linear p = t. (Another schedule would also need the ELBO weight p'(t)/p(t) in the loss.)"""
    if schedule == "linear":
        return t
    raise ValueError(f"unknown mask schedule {schedule!r}")


def step_length(seed: int, step: int, seq_len: int, random_length_fraction: float) -> int:
    """The step's sequence length: seq_len, or for a `random_length_fraction` of steps a length drawn
    uniformly from [1, seq_len] (LLaDA). Keyed by (seed, step) alone, so every rank and micro-batch agrees."""
    if random_length_fraction <= 0:
        return seq_len
    g = keyed_generator(seed, step, "random-length")
    if torch.rand((), generator=g).item() < random_length_fraction:
        return int(torch.randint(1, seq_len + 1, (), generator=g))
    return seq_len


def diffusion_mask(
    tokens: torch.Tensor, sample_index: torch.Tensor, step: int, seed: int, cfg: DiffusionSpec, mask_id: int,
    global_batch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process for a micro-batch: (noisy tokens, masked [B, L] bool, t [B], p(t) [B]).

    Per row: t ~ U(eps, 1) (or stratified across the global batch when `antithetic`), each token masked
    independently with probability p(t), and a row left without a masked token gets one position masked
    at random.
    """
    B, L = tokens.shape
    sample_index = sample_index.cpu()
    t, uniforms, fallback = torch.empty(B, dtype=torch.float64), torch.empty(B, L, dtype=torch.float64), []
    for row, index in enumerate(sample_index.tolist()):
        g = keyed_generator(seed, step, index, "diffusion")
        t[row] = torch.rand((), generator=g, dtype=torch.float64)
        uniforms[row] = torch.rand(L, generator=g, dtype=torch.float64)
        fallback.append(int(torch.randint(L, (), generator=g)))
    if cfg.antithetic:
        offset = torch.rand((), generator=keyed_generator(seed, step, "antithetic"), dtype=torch.float64)
        t = (offset + (sample_index % global_batch).double() / global_batch) % 1.0
    t = cfg.eps + (1 - cfg.eps) * t
    p = mask_probability(t, cfg.mask_schedule)
    masked = uniforms < p[:, None]
    for row in (~masked.any(1)).nonzero().flatten().tolist():
        masked[row, fallback[row]] = True
    masked = masked.to(tokens.device)
    noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    return noisy, masked, t.to(tokens.device), p.to(tokens.device)


def diffusion_loss(
    model, tokens: torch.Tensor, sample_index: torch.Tensor, step: int, seed: int, cfg: DiffusionSpec,
    mask_id: int, global_batch: int,
) -> tuple[torch.Tensor, dict]:
    """Masked-diffusion loss: sum over masked tokens of CE / w, over (rows x seq_len); no label shift.
    w is the row's realized mask ratio (`loss_weight: realized`) or p(t) (`sampled`)."""
    length = step_length(seed, step, tokens.shape[1], cfg.random_length_fraction)
    tokens = tokens[:, :length]
    noisy, masked, t, p = diffusion_mask(tokens, sample_index, step, seed, cfg, mask_id, global_batch)
    logits = model(noisy, causal=False)
    realized = masked.sum(1, dtype=torch.float32) / length
    weight = realized if cfg.loss_weight == "realized" else p.float()
    # CE at every position, then zero weight on unmasked ones: the same work as the AR loss, no host sync.
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view_as(tokens)
    loss = (ce * masked / weight[:, None]).sum() / masked.numel()
    stats = {"mask_ratio": realized.mean().detach(), "t": t.float().mean().detach(), "seq_len": length}
    return loss, stats


def ar_input_mask(tokens: torch.Tensor, sample_index: torch.Tensor, step: int, seed: int, ratio: float) -> torch.Tensor:
    """Which input positions the input-masking ablation replaces by [MASK]: Bernoulli(ratio) per token."""
    rows = [torch.rand(tokens.shape[1], generator=keyed_generator(seed, step, i, "ar-input-mask")) < ratio
            for i in sample_index.cpu().tolist()]
    return torch.stack(rows).to(tokens.device)


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
    """The arm's loss for one micro-batch."""
    if as_arm(arm) is Arm.diffusion:
        return diffusion_loss(model, tokens, sample_index, step, seed, objective.diffusion, mask_id, global_batch)
    return ar_loss(model, tokens, sample_index, step, seed, objective.autoregressive, mask_id)
