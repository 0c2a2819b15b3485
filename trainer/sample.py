"""Generation. DLM: iterative unmasking with low-confidence remasking, block-wise (semi-autoregressive),
as LLaDA's `generate`. AR: token by token with a KV cache, temperature and top-k."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dlmctl.spec.sections import Arm

from .objectives import as_arm


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _generator(seed: int | None, device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    """Gumbel-max perturbation: argmax of the result samples softmax(logits / temperature).
    LLaDA writes it as exp(logits) / (-log u)^temperature in float64; this is its logarithm."""
    if temperature == 0:
        return logits
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return logits.double() - temperature * torch.log(-torch.log(u.clamp_min(1e-300)))


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """How many masked tokens each of `steps` steps reveals, per row [B, steps]: as even as possible,
    the remainder going to the first steps."""
    masked = mask_index.sum(dim=1, keepdim=True)
    counts = (masked // steps).repeat(1, steps)
    counts += torch.arange(steps, device=mask_index.device)[None, :] < (masked % steps)
    return counts


@torch.no_grad()
def dlm_generate(
    model, prompt: torch.Tensor, *, mask_id: int, gen_length: int, steps: int | None = None,
    block_length: int | None = None, temperature: float = 0.0, remasking: str = "low_confidence",
    seed: int | None = 0,
) -> torch.Tensor:
    """prompt [B, P] -> [B, P + gen_length]. The answer starts fully masked; blocks of `block_length` are
    filled left to right, each in steps // n_blocks steps; each step predicts every masked position and
    keeps the most confident (or random) predictions inside the current block, remasking the rest."""
    steps, block_length = steps or gen_length, block_length or gen_length
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({n_blocks})")
    steps_per_block, P = steps // n_blocks, prompt.shape[1]
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), mask_id, dtype=prompt.dtype, device=prompt.device)], 1)
    generator = _generator(seed, x.device)
    for block in range(n_blocks):
        start, end = P + block * block_length, P + (block + 1) * block_length
        counts = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            # never "predict" the mask itself (a trained model gives it ~0 anyway)
            logits = model(x, causal=False).index_fill(-1, torch.tensor([mask_id], device=x.device), -torch.inf)
            x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)
            if remasking == "low_confidence":
                confidence = torch.gather(F.softmax(logits.float(), -1), -1, x0[..., None]).squeeze(-1)
            elif remasking == "random":
                confidence = torch.rand(x0.shape, generator=generator, device=x0.device)
            else:
                raise ValueError(f"remasking: unknown strategy {remasking!r}; choose low_confidence or random")
            confidence[:, end:] = -torch.inf
            confidence = torch.where(mask_index, confidence, -torch.inf)
            x0 = torch.where(mask_index, x0, x)
            transfer = torch.zeros_like(mask_index)
            for row in range(x.shape[0]):
                k = int(counts[row, i])
                if k:
                    transfer[row, torch.topk(confidence[row], k).indices] = True
            x = torch.where(transfer, x0, x)
    return x


@torch.no_grad()
def ar_generate(
    model, prompt: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
    eos_id: int | None = None, use_cache: bool = True, seed: int | None = 0,
) -> torch.Tensor:
    """prompt [B, P] -> [B, P + n], n <= max_new_tokens (stops once every row has emitted eos_id; rows that
    finished earlier are padded with eos_id). Greedy at temperature 0."""
    B, P = prompt.shape
    generator = _generator(seed, prompt.device)
    cache = model.new_kv_cache(B, P + max_new_tokens) if use_cache else None
    x, finished = prompt, torch.zeros(B, dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        if cache is None:
            logits = model(x, causal=True)[:, -1]
        elif x.shape[1] == P:
            logits = model(x, causal=True, kv_cache=cache, start_pos=0)[:, -1]
        else:
            logits = model(x[:, -1:], causal=True, kv_cache=cache, start_pos=x.shape[1] - 1)[:, -1]
        logits = logits.float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -torch.inf)
            nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        x = torch.cat([x, nxt[:, None].to(x.dtype)], 1)
        if eos_id is not None and bool(finished.all()):
            break
    return x


def generate(
    model, arm: Arm | str, prompt_ids, *, gen_length: int = 64, mask_id: int | None = None,
    eos_id: int | None = None, steps: int | None = None, block_length: int | None = None,
    temperature: float = 0.0, top_k: int | None = None, remasking: str = "low_confidence", seed: int | None = 0,
    use_cache: bool = True,
):
    """Generate `gen_length` tokens after the prompt; returns only the new tokens.
    prompt_ids: list[int] -> list[int]; or a LongTensor [B, P] of equal-length prompts -> [B, gen_length]
    (AR may return fewer columns when every row stopped at eos_id). Prompts are cut from the left so
    prompt + answer fit max_seq_len."""
    single = not isinstance(prompt_ids, torch.Tensor)
    device = next(model.parameters()).device
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long) if single else prompt_ids
    prompt = prompt.to(device)
    room = model.shape.max_seq_len - gen_length
    if room < 0:
        raise ValueError(f"gen_length ({gen_length}) does not fit max_seq_len ({model.shape.max_seq_len})")
    prompt = prompt[:, prompt.shape[1] - room:] if prompt.shape[1] > room else prompt
    if prompt.shape[1] == 0 and as_arm(arm) is Arm.autoregressive:
        raise ValueError("autoregressive generation needs at least one prompt token (e.g. EOS)")
    with eval_mode(model):
        if as_arm(arm) is Arm.diffusion:
            if mask_id is None:
                raise ValueError("mask_id: required for diffusion generation")
            out = dlm_generate(model, prompt, mask_id=mask_id, gen_length=gen_length, steps=steps,
                               block_length=block_length, temperature=temperature, remasking=remasking, seed=seed)
        else:
            out = ar_generate(model, prompt, max_new_tokens=gen_length, temperature=temperature, top_k=top_k,
                              eos_id=eos_id, use_cache=use_cache, seed=seed)
    new = out[:, prompt.shape[1]:]
    return new[0].tolist() if single else new

