"""Diffusion-mask generation: the vectorised keyed generator against the per-row generators it replaced.

  * mask time at 256 rows x 2048 tokens (the brief's step) and at the quickstart micro-batch (16 x 128),
    old (a faithful copy of the per-row torch.Generator loop) and new (objectives.diffusion_mask):
    CPU seconds, min and median over repeats, timed interleaved so a busy machine slows both alike;
  * the quickstart model's forward + backward (diffusion objective) on a micro-batch, on this CPU: a step
    of R rows is at least R / micro-batch rows of them, so mask / that is an upper bound on the mask's
    share of a step (time it at --step-seq-len 2048 for the 256 x 2048 step).

Prints a table; writes JSON only with --out.

  python benchmarks/bench_masks.py
  python benchmarks/bench_masks.py --step-seq-len 2048 --step-repeats 2   # the 256 x 2048 step, slow on a CPU
  python benchmarks/bench_masks.py --repeats 21 --out benchmarks/results/bench_masks-cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dlmctl.spec import ModelSpec
from dlmctl.spec.sections import DiffusionSpec
from dlmctl.trainer.models import Transformer
from dlmctl.trainer.objectives import diffusion_loss, diffusion_mask, keyed_generator, mask_probability

MASK_ID = 1023


def per_row_mask(tokens, sample_index, step, seed, cfg: DiffusionSpec, mask_id, global_batch):
    """The mask as dlmctl drew it before the keyed vectorised generator: one torch.Generator per row."""
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


def cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def summary(samples: list[float]) -> dict:
    return {"min_ms": 1e3 * min(samples), "median_ms": 1e3 * statistics.median(samples)}


def time_masks(rows: int, seq_len: int, repeats: int) -> dict:
    cfg, tokens = DiffusionSpec(), torch.randint(0, MASK_ID, (rows, seq_len))
    variants = {"old": per_row_mask, "new": diffusion_mask}
    samples = {name: [] for name in variants}
    for repeat in range(repeats + 1):  # the first round warms up and is dropped
        step = 1000 + repeat
        index = torch.arange(step * rows, (step + 1) * rows)
        for name, fn in variants.items():
            seconds = cpu_seconds(lambda: fn(tokens, index, step, 1234, cfg, MASK_ID, rows))
            if repeat:
                samples[name].append(seconds)
    result = {name: summary(s) for name, s in samples.items()}
    result["old_over_new_median"] = result["old"]["median_ms"] / result["new"]["median_ms"]
    return result


def time_forward_backward(rows: int, seq_len: int, vocab: int, repeats: int) -> dict:
    """One micro-batch of the quickstart model (examples/quickstart.yaml: preset micro, BPE vocab 1024),
    diffusion objective, forward + backward, mask included. A step of R rows is at least R / rows such
    micro-batches (gradient accumulation; the optimizer's own time comes on top)."""
    torch.manual_seed(0)
    model = Transformer(ModelSpec(preset="micro").resolve(vocab_size=vocab, max_seq_len=seq_len))
    tokens, cfg = torch.randint(0, vocab - 1, (rows, seq_len)), DiffusionSpec()
    samples = []
    for step in range(repeats + 1):
        index = torch.arange(step * rows, (step + 1) * rows)

        def forward_backward():
            loss, _ = diffusion_loss(model, tokens, index, step, 1234, cfg, vocab - 1, rows)
            model.zero_grad(set_to_none=True)
            loss.backward()

        seconds = cpu_seconds(forward_backward)
        if step:
            samples.append(seconds)
    return summary(samples) | {"params": model.num_params(), "rows": rows, "seq_len": seq_len}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (numpy's mixing is one thread)")
    p.add_argument("--step-rows", type=int, default=16, help="quickstart micro-batch rows to time")
    p.add_argument("--step-seq-len", type=int, default=128, help="its length: 128 as the quickstart, or --seq-len")
    p.add_argument("--step-repeats", type=int, default=None, help="default --repeats")
    p.add_argument("--no-step", action="store_true", help="skip timing the quickstart model")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "repeats": args.repeats, "masks": {}}
    shapes = [(args.rows, args.seq_len), (16, 128)]
    if (args.step_rows, args.step_seq_len) not in shapes:
        shapes.append((args.step_rows, args.step_seq_len))
    for rows, seq_len in shapes:
        timing = time_masks(rows, seq_len, args.repeats)
        results["masks"][(rows, seq_len)] = timing
        old, new = timing["old"], timing["new"]
        print(f"mask {rows:>4} x {seq_len:<5} old {old['median_ms']:8.2f} ms (min {old['min_ms']:.2f})"
              f"   new {new['median_ms']:7.2f} ms (min {new['min_ms']:.2f})"
              f"   old/new {timing['old_over_new_median']:.1f}x")
    if not args.no_step:
        fb = results["forward_backward"] = time_forward_backward(
            args.step_rows, args.step_seq_len, 1024, args.step_repeats or args.repeats)
        print(f"quickstart model ({fb['params']:,} params) forward + backward, {args.step_rows} x {args.step_seq_len}: "
              f"{fb['median_ms']:.1f} ms (min {fb['min_ms']:.1f})")
        for (rows, seq_len), timing in results["masks"].items():
            per_micro_batch = {name: timing[name]["median_ms"] / fb["median_ms"] for name in ("old", "new")}
            timing["over_timed_forward_backward"] = per_micro_batch
            print(f"mask {rows} x {seq_len} / the timed {args.step_rows} x {args.step_seq_len} forward + backward: "
                  f"old {100 * per_micro_batch['old']:.2g}%, new {100 * per_micro_batch['new']:.2g}%")
            if seq_len != args.step_seq_len:
                continue
            step_ms = fb["median_ms"] * rows / args.step_rows  # a lower bound on the step: accumulation only
            share = {name: timing[name]["median_ms"] / step_ms for name in ("old", "new")}
            timing["share_of_step_at_most"] = share
            print(f"mask {rows} x {seq_len} / a step of {rows} x {seq_len} (>= {step_ms / 1e3:.2f} s): "
                  f"old <= {100 * share['old']:.2g}%, new <= {100 * share['new']:.2g}%")
    results["masks"] = {f"{rows}x{seq_len}": timing for (rows, seq_len), timing in results["masks"].items()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
