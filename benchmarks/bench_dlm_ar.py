"""What a DLM training step costs next to an AR step of the same model, by sequence length, and why.

The two arms run the same module; the DLM's bidirectional attention does the full L x L score and value work
where causal SDPA skips the upper triangle, so the gap grows with L. Per sequence length, timed in paired
rounds (a random order each round, min/median, CPU time beside wall time; see bench_model.py):

  * ours_ar and ours_dlm: one full step (objective, forward, backward, fused AdamW);
  * sdpa_causal and sdpa_full: SDPA alone, forward + backward, on one layer's q, k, v at that shape.

Reported: the DLM/AR step-cost ratio; the attention share of each step (n_layer x SDPA time / step time);
the ratio predicted from the attention kernels alone, (AR step + n_layer x (full - causal)) / AR step; and the
FLOPs ratio with causal attention counted as half (Transformer.flops_per_token). Results go to stdout, and to
a JSON file only with --out.

  python benchmarks/bench_dlm_ar.py                       # seq 256 and 2048 on CPU, a few minutes
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import DTYPES, paired, spread, step_functions, sync, time_rounds  # noqa: E402  (sets OMP)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dlmctl.spec import ModelShape  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step: batch = tokens / seq_len (>= 1)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="time the models compiled (torch.compile per block)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def attention_alone(shape: ModelShape, batch: int, dtype, device, causal: bool):
    """One layer's SDPA, forward + backward, at the model's shape."""
    q, k, v = (torch.randn(batch, shape.n_head, shape.max_seq_len, shape.head_dim, dtype=dtype, device=device,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def run():
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)
        q.grad = k.grad = v.grad = None
    return run


def measure(args, seq_len, dtype, device) -> dict:
    shape = ModelShape(n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head, n_kv_head=args.n_head,
                       d_ff=args.d_ff, vocab_size=args.vocab, max_seq_len=seq_len)
    batch = max(1, args.tokens // seq_len)
    fns, _, model = step_functions(shape, batch, dtype, device, with_llama=False, compiled=args.compile)
    suffix = "_compiled" if args.compile else ""
    fns = {"ours_ar": fns[f"ours_ar{suffix}"], "ours_dlm": fns[f"ours_dlm{suffix}"],
           "sdpa_causal": attention_alone(shape, batch, dtype, device, True),
           "sdpa_full": attention_alone(shape, batch, dtype, device, False)}
    wall, cpu, _ = time_rounds(fns, args.rounds, args.warmup, device, args.seed)
    t = {k: statistics.median(v) for k, v in wall.items()}
    n = shape.n_layer
    return {
        "seq_len": seq_len, "batch": batch, "params": model.num_params(),
        "step_seconds": {k: {"wall": spread(wall[k]), "cpu": spread(cpu[k])} for k in wall},
        "dlm_over_ar_step_cost": paired(wall["ours_dlm"], wall["ours_ar"]),
        "dlm_over_ar_cpu": paired(cpu["ours_dlm"], cpu["ours_ar"]),
        "attention_share": {"ar": n * t["sdpa_causal"] / t["ours_ar"], "dlm": n * t["sdpa_full"] / t["ours_dlm"]},
        "full_over_causal_attention": paired(wall["sdpa_full"], wall["sdpa_causal"]),
        "predicted_dlm_over_ar": (t["ours_ar"] + n * (t["sdpa_full"] - t["sdpa_causal"])) / t["ours_ar"],
        "flops_dlm_over_ar": model.flops_per_token(seq_len, causal=False) / model.flops_per_token(seq_len, causal=True),
    }


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    results = [measure(args, L, dtype, device) for L in args.seq_lens]
    sync(device)
    text = json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
                       "compiled": args.compile, "results": results}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    for r in results:
        c = r["dlm_over_ar_step_cost"]
        print(f"seq {r['seq_len']:>5} batch {r['batch']}: DLM/AR step cost median {c['median']:.3f} (rounds "
              f"{c['min']:.3f}..{c['max']:.3f}; CPU time {r['dlm_over_ar_cpu']['median']:.3f}); attention share AR "
              f"{r['attention_share']['ar']:.1%} DLM {r['attention_share']['dlm']:.1%}; full/causal SDPA "
              f"{r['full_over_causal_attention']['median']:.2f}; predicted from SDPA alone "
              f"{r['predicted_dlm_over_ar']:.3f}; FLOPs ratio {r['flops_dlm_over_ar']:.3f}")


if __name__ == "__main__":
    main()
