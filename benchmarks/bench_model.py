"""Training-step throughput of the dlmctl backbone, as ratios against baselines measured in the same run.

  * ours (AR objective) vs transformers' LlamaForCausalLM with the same shape, batch, dtype, attention kernel
    (SDPA) and optimizer (torch's fused AdamW, as the trainer uses): tokens/s of one step (forward + backward
    + AdamW); ratio ours / llama, both eager and both compiled (torch.compile per block, for each model
    alike), with each compiled variant's compile time (its first step less its median step);
  * DLM step cost / AR step cost on our model (benchmarks/bench_dlm_ar.py explains it by sequence length);
  * with CUDA: MFU of a ~350M model (preset `350m`) in bf16, AR and DLM, compiled.

Variants are timed in rounds: each round runs one step of every variant, in a random order (seeded), so
a busy machine slows them alike and none always follows another. Reported per variant: wall and CPU
seconds per step (min and median over the rounds); ratios are paired per round (median, min and max over
the rounds) and also taken of the fastest steps. On CPU one thread waiting passively by default
(--threads): on a shared machine more threads mostly measure the neighbours. Results go to stdout, and
to a JSON file only with --out.

  python benchmarks/bench_model.py                       # small CPU defaults, about three minutes
  python benchmarks/bench_model.py --no-compile          # eager only, about a minute
  python benchmarks/bench_model.py --device cuda --dtype bf16 --n-layer 24 --d-model 1024 ... --out r.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

import torch
import torch.nn.functional as F

from dlmctl.spec import ModelShape, ModelSpec
from dlmctl.spec.sections import AutoregressiveSpec, DiffusionSpec
from dlmctl.trainer.engine import apply_compile
from dlmctl.trainer.metrics import peak_flops as trainer_peak_flops
from dlmctl.trainer.models import Transformer
from dlmctl.trainer.objectives import ar_loss, diffusion_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=None)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--untied", action="store_true", help="untied embeddings (default tied)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time both models compiled (torch.compile per block)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds; each times one step of every variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="of the order of the variants in each round")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--mfu-preset", default="350m", help="preset for the CUDA MFU measurement; 'none' skips it")
    p.add_argument("--mfu-seq-len", type=int, default=2048)
    p.add_argument("--mfu-batch", type=int, default=8)
    p.add_argument("--mfu-rounds", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak, if not recognised")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama_like(shape: ModelShape, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.d_ff,
        num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head, num_key_value_heads=shape.n_kv_head,
        max_position_embeddings=shape.max_seq_len, rms_norm_eps=shape.norm_eps, tie_word_embeddings=shape.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta}, attention_bias=False, mlp_bias=False,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the trainer's (trainer/engine.py)


def compile_blocks(model) -> None:
    """torch.compile per transformer block, in place: ours as the trainer does, Llama's decoder layers alike."""
    if isinstance(model, Transformer):
        apply_compile(model)
    else:
        for layer in model.model.layers:
            layer.compile()


def step_functions(shape, batch, dtype, device, with_llama=True, compiled=False):
    """name -> a function running one full training step; each builds its own model and optimizer. Compiled
    variants are named *_compiled."""
    mask_id, L = shape.vocab_size - 1, shape.max_seq_len
    gen = torch.Generator().manual_seed(0)
    ar_tokens = torch.randint(0, mask_id, (batch, L + 1), generator=gen).to(device)  # L positions through the model
    dlm_tokens = ar_tokens[:, :L].contiguous()
    index = torch.arange(batch)
    functions, params = {}, {}

    def ours(objective, compiled):
        model = Transformer(shape).to(device=device, dtype=dtype).train()
        if compiled:
            compile_blocks(model)
        opt = optimizer(model)
        params["ours"] = model.num_params()
        counter = iter(range(10**9))

        def run():
            step = next(counter)
            if objective == "ar":
                loss, _ = ar_loss(model, ar_tokens, index + step * batch, step, 0, AutoregressiveSpec(), mask_id)
            else:
                loss, _ = diffusion_loss(model, dlm_tokens, index + step * batch, step, 0, DiffusionSpec(), mask_id, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run, model

    def llama(compiled):
        model = llama_like(shape, dtype, device).train()
        if compiled:
            compile_blocks(model)
        opt = optimizer(model)
        params["llama"] = sum(p.numel() for p in model.parameters())

        def run():
            logits = model(input_ids=ar_tokens[:, :-1]).logits
            F.cross_entropy(logits.flatten(0, 1).float(), ar_tokens[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    for suffix in ("", "_compiled") if compiled else ("",):
        functions[f"ours_ar{suffix}"], flops_model = ours("ar", bool(suffix))
        functions[f"ours_dlm{suffix}"], _ = ours("dlm", bool(suffix))
        if with_llama:
            functions[f"llama_ar{suffix}"] = llama(bool(suffix))
    return functions, params, flops_model


def time_rounds(functions, rounds, warmup, device, seed):
    """Per variant, the wall and CPU seconds of its step in each round (each round runs every variant once,
    in a random order), and the wall seconds of its first step (a compiled variant compiles then)."""
    first = {}
    for name, fn in functions.items():
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        first[name] = time.perf_counter() - began
        for _ in range(warmup - 1):
            fn()
    sync(device)
    order = random.Random(seed)
    wall = {name: [] for name in functions}
    cpu = {name: [] for name in functions}
    for _ in range(rounds):
        names = list(functions)
        order.shuffle(names)
        for name in names:
            began_cpu, began = time.process_time(), time.perf_counter()
            functions[name]()
            sync(device)
            wall[name].append(time.perf_counter() - began)
            cpu[name].append(time.process_time() - began_cpu)
    return wall, cpu, first


def spread(values) -> dict:
    return {"min": min(values), "median": statistics.median(values)}


def paired(numerator, denominator) -> dict:
    """numerator / denominator per round (median, min, max), and of their fastest rounds."""
    ratios = [n / d for n, d in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "of_fastest": min(numerator) / min(denominator)}


def peak_flops(device, override_tflops):
    return override_tflops * 1e12 if override_tflops else trainer_peak_flops(device)


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shape = ModelShape(
        n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head, n_kv_head=args.n_kv_head or args.n_head,
        d_ff=args.d_ff, vocab_size=args.vocab, max_seq_len=args.seq_len, tie_embeddings=not args.untied,
    )
    tokens_per_step = args.batch * args.seq_len
    functions, params, model = step_functions(shape, args.batch, dtype, device, compiled=args.compile)
    assert params["ours"] == params["llama"], f"shapes differ: ours {params['ours']} vs llama {params['llama']} params"
    wall, cpu, first = time_rounds(functions, args.rounds, args.warmup, device, args.seed)
    seconds = {name: statistics.median(t) for name, t in wall.items()}
    del functions
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})",
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "shape": shape.model_dump(),
        "params": params["ours"], "batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds,
        "step_seconds": {name: {"wall": spread(wall[name]), "cpu": spread(cpu[name])} for name in wall},
        "tokens_per_second": {name: tokens_per_step / s for name, s in seconds.items()},
    }
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        suffix = "_compiled" if mode == "compiled" else ""
        result[mode] = {
            "ours_over_llama_tokens_per_second": paired(wall[f"llama_ar{suffix}"], wall[f"ours_ar{suffix}"]),
            "ours_over_llama_cpu": paired(cpu[f"llama_ar{suffix}"], cpu[f"ours_ar{suffix}"]),
            "dlm_over_ar_step_cost": paired(wall[f"ours_dlm{suffix}"], wall[f"ours_ar{suffix}"]),
        }
    if args.compile:
        result["compile_seconds"] = {name: first[name] - seconds[name] for name in wall if name.endswith("_compiled")}
        result["compiled_over_eager_tokens_per_second"] = {
            arm: paired(wall[arm], wall[f"{arm}_compiled"]) for arm in ("ours_ar", "llama_ar")}
    peak = peak_flops(device, args.peak_tflops)
    if peak:
        result["mfu_this_shape"] = {k: model.flops_per_token(args.seq_len, causal="_ar" in k) * tokens_per_step
                                    / seconds[k] / peak for k in seconds if k.startswith("ours")}
    if device.type == "cuda" and args.mfu_preset != "none":
        result["mfu"] = mfu(args, device, peak)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        speed, cpu_speed, cost = (result[mode][k] for k in ("ours_over_llama_tokens_per_second", "ours_over_llama_cpu",
                                                             "dlm_over_ar_step_cost"))
        print(f"{mode:>8}: ours/llama tokens/s median {speed['median']:.3f} (rounds {speed['min']:.3f}..{speed['max']:.3f},"
              f" fastest steps {speed['of_fastest']:.3f}; CPU time {cpu_speed['median']:.3f})   DLM/AR step cost median "
              f"{cost['median']:.3f} (rounds {cost['min']:.3f}..{cost['max']:.3f})")
    if args.compile:
        print("compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["compile_seconds"].items()))
    if result.get("mfu", {}).get("mfu", {}).get("ours_ar_compiled"):
        m = result["mfu"]["mfu"]
        print(f"MFU {args.mfu_preset} bf16 compiled: AR {m['ours_ar_compiled']:.1%} DLM {m['ours_dlm_compiled']:.1%}")


def mfu(args, device, peak) -> dict:
    """MFU of preset `--mfu-preset` in bf16, compiled (as the trainer runs on CUDA), AR and DLM: model FLOPs per
    token count causal attention as half (Transformer.flops_per_token)."""
    shape = ModelSpec(preset=args.mfu_preset).resolve(vocab_size=32768, max_seq_len=args.mfu_seq_len)
    fns, params, model = step_functions(shape, args.mfu_batch, torch.bfloat16, device, with_llama=False, compiled=True)
    fns = {k: f for k, f in fns.items() if k.endswith("_compiled")}
    wall, _, first = time_rounds(fns, args.mfu_rounds, args.warmup, device, args.seed)
    seconds = {k: statistics.median(t) for k, t in wall.items()}
    tokens = args.mfu_batch * args.mfu_seq_len
    flops = {k: model.flops_per_token(args.mfu_seq_len, causal="_ar" in k) for k in seconds}
    return {
        "preset": args.mfu_preset, "params": params["ours"], "batch": args.mfu_batch, "seq_len": args.mfu_seq_len,
        "peak_tflops": peak / 1e12 if peak else None, "flops_per_token": flops,
        "compile_seconds": {k: first[k] - s for k, s in seconds.items()},
        "tokens_per_second": {k: tokens / s for k, s in seconds.items()},
        "mfu": {k: flops[k] * tokens / s / peak if peak else None for k, s in seconds.items()},
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }


if __name__ == "__main__":
    main()
