"""A stand-in for `python -m dlmctl.trainer` that honours the trainer contract without torch.

Reads the Run from $DLMCTL_RUN_SPEC (or --run FILE), writes <output>/metrics.jsonl events (built by
the trainer's own writer from the spec.contracts models, so a renamed field breaks this too) and a few
log lines, exits 0. Knobs, from the environment:
    FAKE_TRAINER_STEPS   optimizer steps to report (default 4)
    FAKE_TRAINER_SLEEP   seconds per step (default 0)
    FAKE_TRAINER_FAIL    an arm or run name that exits 3 halfway
    FAKE_TRAINER_HANG    an arm or run name that sleeps until it is killed (cancel tests)
It also writes <output>/fake_env.json: the distributed environment it saw and its arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dlmctl.trainer.metrics import build_event, event_line


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    run = json.loads(args.run.read_text() if args.run else os.environ["DLMCTL_RUN_SPEC"])
    args.output.mkdir(parents=True, exist_ok=True)
    seen = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    (args.output / "fake_env.json").write_text(json.dumps({"env": seen, "argv": sys.argv[1:]}))
    if os.environ.get("RANK", "0") != "0":
        return 0  # like the real trainer, only rank 0 reports

    steps = int(os.environ.get("FAKE_TRAINER_STEPS", "4"))
    pause = float(os.environ.get("FAKE_TRAINER_SLEEP", "0"))
    selected = lambda knob: os.environ.get(knob) in (run["arm"], run["name"])  # noqa: E731
    seq_len = run["spec"]["data"]["seq_len"]
    batch = run["spec"]["batch"]["global_sequences"] or 32
    epochs = run["spec"]["data"]["epochs"]
    base = 5.0 if run["arm"] == "diffusion" else 4.5
    print(f"fake trainer: {run['name']} ({run['arm']}) for {steps} steps", flush=True)
    with open(args.output / "metrics.jsonl", "a") as metrics:
        def emit(event, **fields):
            metrics.write(event_line(build_event(event, **fields)))
            metrics.flush()

        for step in range(1, steps + 1):
            if selected("FAKE_TRAINER_HANG"):
                print("hanging until killed", flush=True)
                while True:
                    time.sleep(0.1)
            if selected("FAKE_TRAINER_FAIL") and step > steps // 2:
                print("fake trainer: simulated failure", file=sys.stderr, flush=True)
                return 3
            loss = base / step
            emit("train", step=step, total_steps=steps, epoch=epochs * step / steps,
                 tokens=step * batch * seq_len, train_loss=loss, lr=1e-3)
            print(f"step {step}/{steps} loss {loss:.3f}", flush=True)
            time.sleep(pause)
        emit("checkpoint", step=steps, epoch=epochs, uri=str(args.output / "checkpoints" / f"step-{steps:08d}"))
        emit("eval", step=steps, total_steps=steps, epoch=epochs, tokens=steps * batch * seq_len,
             val_loss=base / steps + 0.1, val_loss_stderr=0.01)
        emit("done", step=steps, total_steps=steps, epoch=epochs, tokens=steps * batch * seq_len)
    print("fake trainer: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
