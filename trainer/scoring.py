"""Likelihood scoring for evaluation: continuation log-likelihoods, multiple choice and validation loss.

AR scores are exact. DLM scores are Monte-Carlo estimates of the masked-diffusion bound, drawn with
fixed keyed seeds so that numbers are comparable across checkpoints:

    log p(a | c) >= - E_{k ~ U{1..n}} [ n / k * sum over k masked answer positions of CE ]

(LLaDA's evaluation form; it equals the continuous-time bound E_{t ~ U(0,1)} [1/t * sum_masked CE], since
integrating t out given k masked of n gives weight 1/k.) The k of the draws are stratified over 1..n
as LLaDA's eval does. Requests are (context ids, continuation ids) pairs.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from dlmctl.spec.sections import Arm

from .objectives import as_arm, keyed_generator
from .sample import dlm_generate, eval_mode

Request = tuple[Sequence[int], Sequence[int]]


def stratified_masks(n: int, draws: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks [draws, n] bool, k [draws]): draw j masks k_j random positions of n, with the k_j spread
    evenly over 1..n from a random start (LLaDA's stratified mask counts; LLaDA rounds, flooring gives
    every count exactly draws/n draws when n divides draws)."""
    start = int(torch.randint(1, n + 1, (), generator=generator))
    k = torch.floor(start + torch.arange(draws, dtype=torch.float64) * n / draws + 1e-9).long()
    k = (k - 1) % n + 1
    ranks = torch.stack([torch.randperm(n, generator=generator) for _ in range(draws)])
    return ranks < k[:, None], k


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _fit(context: Sequence[int], continuation: Sequence[int], room: int) -> list[int]:
    if not continuation:
        raise ValueError("continuation: must hold at least one token")
    if len(continuation) > room:
        raise ValueError(f"continuation of {len(continuation)} tokens does not fit the model's {room} positions")
    return list(context)[max(0, len(context) + len(continuation) - room):] + list(continuation)


@torch.no_grad()
def ar_loglikelihood(model, requests: Sequence[Request], *, batch_size: int = 16) -> list[tuple[float, bool]]:
    """Exact log p(continuation | context) and whether greedy decoding reproduces it. Context must be
    non-empty (pass [eos] for an unconditional score); it is cut from the left to fit max_seq_len."""
    results: list = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    device = _device(model)
    with eval_mode(model):
        for chunk in (order[i:i + batch_size] for i in range(0, len(order), batch_size)):
            seqs = []
            for i in chunk:
                if not requests[i][0]:
                    raise ValueError("context: autoregressive scoring needs at least one context token (e.g. EOS)")
                seqs.append(_fit(*requests[i], model.shape.max_seq_len + 1))
            width = max(len(s) for s in seqs) - 1
            inputs = torch.zeros(len(seqs), width, dtype=torch.long)
            for row, s in enumerate(seqs):
                inputs[row, :len(s) - 1] = torch.tensor(s[:-1])
            logprobs = F.log_softmax(model(inputs.to(device), causal=True).float(), -1).cpu()
            for row, (i, s) in enumerate(zip(chunk, seqs)):
                n = len(requests[i][1])
                positions = torch.arange(len(s) - 1 - n, len(s) - 1)
                target = torch.tensor(s[-n:])
                scored = logprobs[row, positions]
                results[i] = (float(scored.gather(-1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
    return results


@torch.no_grad()
def dlm_loglikelihood(
    model, requests: Sequence[Request], *, mask_id: int, mc_samples: int = 16, seed: int = 0,
    batch_size: int = 32, greedy: bool = False,
) -> list[tuple[float, bool]]:
    """Monte-Carlo estimate of log p(continuation | context): only the answer span is masked, the mask
    counts stratified over 1..len(answer). Draws are keyed by (seed, context, answer length), so candidate
    answers of equal length share their mask patterns (common random numbers). With `greedy`, the second
    element says whether greedy low-confidence unmasking of the span, one token per step, reproduces the
    answer (LLaDA); otherwise it is False."""
    device, room = _device(model), model.shape.max_seq_len
    totals = [0.0] * len(requests)
    rows_by_length: dict[int, list] = defaultdict(list)  # bidirectional attention: no padding, batch equal lengths
    for i, (context, continuation) in enumerate(requests):
        seq = torch.tensor(_fit(context, continuation, room))
        n = len(continuation)
        masks, k = stratified_masks(n, mc_samples, keyed_generator(seed, "dlm-score", tuple(seq[:-n].tolist()), n))
        for j in range(mc_samples):
            masked = torch.cat([torch.zeros(len(seq) - n, dtype=torch.bool), masks[j]])
            rows_by_length[len(seq)].append((i, masked, seq, n / float(k[j])))
    with eval_mode(model):
        for rows in rows_by_length.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                masked = torch.stack([r[1] for r in chunk]).to(device)
                clean = torch.stack([r[2] for r in chunk]).to(device)
                logits = model(torch.where(masked, mask_id, clean), causal=False)
                ce = torch.zeros(clean.shape, device=device)
                ce[masked] = F.cross_entropy(logits[masked].float(), clean[masked], reduction="none")
                for (i, _, _, weight), row_ce in zip(chunk, ce.sum(1).tolist()):
                    totals[i] -= weight * row_ce / mc_samples
        greedy_hits = [False] * len(requests)
        if greedy:
            for i, (context, continuation) in enumerate(requests):
                seq = _fit(context, continuation, room)
                n = len(continuation)
                prompt = torch.tensor([seq[:-n]], dtype=torch.long, device=device)
                out = dlm_generate(model, prompt, mask_id=mask_id, gen_length=n, steps=n, block_length=n, seed=None)
                greedy_hits[i] = out[0, -n:].tolist() == list(continuation)
    return list(zip(totals, greedy_hits))


def loglikelihood(
    model, arm: Arm | str, requests: Sequence[Request], *, mask_id: int | None = None, mc_samples: int = 16,
    seed: int = 0, batch_size: int = 16, greedy: bool = False,
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per request: exact for AR, Monte-Carlo for DLM."""
    if as_arm(arm) is Arm.autoregressive:
        return ar_loglikelihood(model, requests, batch_size=batch_size)
    if mask_id is None:
        raise ValueError("mask_id: required for diffusion scoring")
    return dlm_loglikelihood(model, requests, mask_id=mask_id, mc_samples=mc_samples, seed=seed,
                             batch_size=batch_size, greedy=greedy)


def choose(
    model, arm: Arm | str, context: Sequence[int], candidates: Sequence[Sequence[int]], *,
    mask_id: int | None = None, mc_samples: int = 16, seed: int = 0, normalize: bool = False,
) -> int:
    """Index of the most likely candidate continuation (per token when `normalize`)."""
    scores = loglikelihood(model, arm, [(context, c) for c in candidates], mask_id=mask_id,
                           mc_samples=mc_samples, seed=seed, batch_size=max(16, len(candidates) * mc_samples))
    values = [s / len(c) if normalize else s for (s, _), c in zip(scores, candidates)]
    return max(range(len(values)), key=values.__getitem__)


@torch.no_grad()
def validation_loss(
    model, arm: Arm | str, batches: Iterable[torch.Tensor], *, mask_id: int | None = None, samples: int = 4,
    seed: int = 0,
) -> tuple[float, float]:
    """(loss per token, Monte-Carlo standard error) over validation batches of token ids [B, L].

    AR: exact next-token NLL (tokens[:, :-1] predict tokens[:, 1:]); the error is 0.
    DLM: the negative ELBO per token, `samples` stratified draws per sequence keyed by (seed, row number),
    so the same validation set gets the same masks at every step. Each draw of a row gives
    (1/k) * sum of CE over its k masked tokens; the error is the MC standard error of the mean given the
    validation set, sqrt(sum_r L_r^2 var_r / samples) / sum_r L_r with var_r the draws' sample variance
    (with one draw, the spread across rows stands in for it and over-states the error)."""
    arm = as_arm(arm)
    if arm is Arm.diffusion and mask_id is None:
        raise ValueError("mask_id: required for the diffusion ELBO")
    device = _device(model)
    nll_sum, count, row = 0.0, 0, 0
    row_means, row_vars, row_lengths = [], [], []
    with eval_mode(model):
        for tokens in batches:
            tokens = tokens.to(device)
            if arm is Arm.autoregressive:
                logits = model(tokens[:, :-1], causal=True)
                nll_sum += float(F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"))
                count += tokens[:, 1:].numel()
                continue
            B, L = tokens.shape
            draws = [stratified_masks(L, samples, keyed_generator(seed, "elbo", row + r)) for r in range(B)]
            per_draw = torch.empty(B, samples, dtype=torch.float64)
            for s in range(samples):
                masked = torch.stack([m[s] for m, _ in draws]).to(device)
                k = torch.tensor([float(kk[s]) for _, kk in draws], dtype=torch.float64)
                ce = torch.zeros(B, L, device=device)
                ce[masked] = F.cross_entropy(model(torch.where(masked, mask_id, tokens), causal=False)[masked].float(),
                                             tokens[masked], reduction="none")
                per_draw[:, s] = ce.sum(1).double().cpu() / k
            row_means += per_draw.mean(1).tolist()
            row_vars += (per_draw.var(1).tolist() if samples > 1 else [math.nan] * B)
            row_lengths += [L] * B
            row += B
    if arm is Arm.autoregressive:
        if not count:
            raise ValueError("batches: no validation tokens")
        return nll_sum / count, 0.0
    if not row_means:
        raise ValueError("batches: no validation tokens")
    means, lengths = torch.tensor(row_means, dtype=torch.float64), torch.tensor(row_lengths, dtype=torch.float64)
    mean = float((means * lengths).sum() / lengths.sum())
    if samples > 1:
        variance = (lengths.pow(2) * torch.tensor(row_vars, dtype=torch.float64)).sum() / samples
        return mean, float(variance.sqrt() / lengths.sum())
    spread = float(means.std()) if len(means) > 1 else math.nan
    return mean, spread / math.sqrt(len(means))
