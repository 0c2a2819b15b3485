"""The crossover at CPU scale: runs examples/crossover-cpu.yaml (DLM vs AR, unique budgets x epochs at fixed
total tokens, two seeds) with the local backend, then writes what `dlmctl compare` reports.

    python benchmarks/crossover_cpu.py --out docs/results/crossover-cpu [--parallel 2] [--spec FILE]

Run it from the repository root: the spec reads ../shared/data (WikiText-2) relative to it. Writes only
under --out: compare.txt (the tables for val_loss, val_bpb and choice_acc, each by tokens), compare.json
(val_loss), crossover-cpu.png/.html and run.json (command, commit, machine, wall time). Without --out it
prints the tables only. The runs themselves live in $DLMCTL_HOME like any local experiment.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "crossover-cpu.yaml"
NAME = "crossover-cpu"
METRICS = ("val_loss", "val_bpb", "choice_acc")


def dlmctl(*args: str, env: dict | None = None, capture: bool = True) -> str:
    command = [str(Path(sys.executable).with_name("dlmctl")), *args]
    done = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=capture)
    if done.returncode:
        sys.exit(f"crossover_cpu: {' '.join(command[1:])} failed ({done.returncode}):\n{(done.stderr or '')[-3000:]}")
    return done.stdout if capture else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the tables, JSON and plots here")
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (DLMCTL_LOCAL_PARALLEL)")
    parser.add_argument("--compare-only", action="store_true", help="report on the finished experiment only")
    args = parser.parse_args()
    env = {**os.environ, "DLMCTL_LOCAL_PARALLEL": str(args.parallel)}
    wall = None
    if not args.compare_only:
        start = time.monotonic()
        dlmctl("submit", str(args.spec), "--backend", "local", "--wait", "--replace", env=env, capture=False)
        wall = time.monotonic() - start
    tables = {m: dlmctl("compare", NAME, "--backend", "local", "--metric", m) for m in METRICS}
    for metric, table in tables.items():
        print(f"## {metric}\n{table}")
    if args.out is None:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.txt").write_text("".join(f"## --metric {m}\n\n{t}\n" for m, t in tables.items()))
    (args.out / "compare.json").write_text(dlmctl("compare", NAME, "--backend", "local", "-o", "json"))
    dlmctl("compare", NAME, "--backend", "local", "--plot", str(args.out / f"{NAME}.png"),
           "--html", str(args.out / f"{NAME}.html"))
    dlmctl("compare", NAME, "--backend", "local", "--metric", "choice_acc",
           "--plot", str(args.out / f"{NAME}-choice-acc.png"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, capture_output=True).stdout.strip()
    (args.out / "run.json").write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/crossover_cpu.py", *sys.argv[1:]]),
        "spec": str(args.spec.resolve().relative_to(ROOT)) if args.spec.resolve().is_relative_to(ROOT) else str(args.spec),
        "commit": commit, "parallel": args.parallel, "wall_seconds": wall, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
