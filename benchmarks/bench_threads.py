"""CPU cost of a training step of the quickstart model on a machine whose other cores are busy: OpenMP
threads that spin-wait (torch's default: one thread per core, libgomp's default wait policy) against one
passive thread per process (what the local backend and the pods now set: OMP_NUM_THREADS from the CPUs
per process, OMP_WAIT_POLICY=PASSIVE).

The model and batch are examples/quickstart.yaml's diffusion run (preset micro, seq_len 128, 32 sequences
in micro-batches of 16): forward, backward and an AdamW step. While it runs, `--busy` processes spin on
the other cores (default: all but one). Each variant runs in a process of its own (the wait policy is read
when OpenMP loads); the variants are interleaved, in a random order each round, `--repeats` rounds.
Reported per variant: CPU seconds and wall seconds per step (min and median over the rounds), and the
paired ratio of CPU seconds per step, spinning / passive, per round (min and median).

    python benchmarks/bench_threads.py [--repeats 5] [--steps 4] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
VARIANTS = {  # name -> thread settings of the training process
    "2 threads, default wait (spins)": {"OMP_NUM_THREADS": "2"},
    "2 threads, passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread, passive": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}
SPINNING, PASSIVE = "2 threads, default wait (spins)", "1 thread, passive"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="rounds; each runs every variant once")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per variant and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--busy", type=int, default=None, help="busy-loop processes (default: CPUs - 1, at least 1)")
    p.add_argument("--seed", type=int, default=0, help="of the order of the variants in each round")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def child(steps: int, warmup: int) -> dict:
    """Train the quickstart's diffusion model for warmup + steps steps; CPU and wall seconds per timed step."""
    import torch

    from dlmctl.spec import load_experiment
    from dlmctl.trainer.runs import build_model
    from dlmctl.trainer.objectives import diffusion_loss

    run = next(r for r in load_experiment(QUICKSTART).runs() if r.arm.value == "diffusion")
    spec = run.spec
    vocab, seq_len = spec.data.tokenizer.vocab_size, spec.data.seq_len
    batch, micro = spec.batch.global_sequences, spec.batch.micro_batch_sequences
    model = build_model(run, vocab).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.optimizer.lr, weight_decay=spec.optimizer.weight_decay)
    tokens = torch.randint(0, vocab - 1, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def step(n: int) -> None:
        for start in range(0, batch, micro):
            index = torch.arange(start, start + micro) + n * batch
            loss, _ = diffusion_loss(model, tokens[start:start + micro], index, n, spec.seed, spec.objective.diffusion,
                                     vocab - 1, batch)
            (loss * micro / batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for n in range(warmup):
        step(n)
    cpu, wall = time.process_time(), time.perf_counter()
    for n in range(warmup, warmup + steps):
        step(n)
    return {"cpu_s_per_step": (time.process_time() - cpu) / steps, "wall_s_per_step": (time.perf_counter() - wall) / steps,
            "torch_threads": torch.get_num_threads(), "params": model.num_params()}


def run_variant(settings: dict, steps: int, warmup: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(settings)
    done = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps), "--warmup", str(warmup)],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the training process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def summary(values: list[float]) -> dict:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4)}


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.warmup)))
        return 0
    busy_count = args.busy if args.busy is not None else max(1, cpus() - 1)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy_count)]
    order = random.Random(args.seed)
    rounds = []
    try:
        for _ in range(args.repeats):
            names = list(VARIANTS)
            order.shuffle(names)
            rounds.append({name: run_variant(VARIANTS[name], args.steps, args.warmup) for name in names})
            print(f"round {len(rounds)}: " + ", ".join(f"{n}: {r['cpu_s_per_step']:.2f} CPU-s/step"
                                                        for n, r in rounds[-1].items()), file=sys.stderr, flush=True)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    result = {
        "machine_cpus": cpus(), "busy_processes": busy_count, "repeats": args.repeats, "steps": args.steps,
        "params": rounds[0][SPINNING]["params"],
        "variants": {name: {"settings": VARIANTS[name],
                            "cpu_s_per_step": summary([r[name]["cpu_s_per_step"] for r in rounds]),
                            "wall_s_per_step": summary([r[name]["wall_s_per_step"] for r in rounds])}
                     for name in VARIANTS},
        "cpu_ratio_spinning_over_passive": summary([r[SPINNING]["cpu_s_per_step"] / r[PASSIVE]["cpu_s_per_step"]
                                                    for r in rounds]),
        "wall_ratio_spinning_over_passive": summary([r[SPINNING]["wall_s_per_step"] / r[PASSIVE]["wall_s_per_step"]
                                                     for r in rounds]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    cpu, wall = result["cpu_ratio_spinning_over_passive"], result["wall_ratio_spinning_over_passive"]
    print(f"CPU-s per step, 2 spinning threads / 1 passive thread: median {cpu['median']:.2f} (min {cpu['min']:.2f}); "
          f"wall time: median {wall['median']:.2f} (min {wall['min']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
