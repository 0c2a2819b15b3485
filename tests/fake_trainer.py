"""A stand-in for `python -m dlmctl.trainer` that honours the trainer contract without torch.

Reads the Run from $DLMCTL_RUN_SPEC (or --run FILE), writes <output>/metrics.jsonl events (built by
the trainer's own writer from the spec.contracts models, so a renamed field breaks this too) and a few
log lines, exits 0. Knobs, from the environment:
    FAKE_TRAINER_STEPS   optimizer steps to report (default 4)
    FAKE_TRAINER_SLEEP   seconds per step (default 0)
    FAKE_TRAINER_FAIL    an arm or run name that exits 3 halfway
    FAKE_TRAINER_HANG    an arm or run name that sleeps until it is killed (cancel tests)
    FAKE_TRAINER_FAIL_CODE  the exit code of FAKE_TRAINER_FAIL (default 3)
    FAKE_TRAINER_CHECKPOINTS  1: checkpoint every step into <output>/checkpoints/step-N (a manifest.json
                         written last) and, like the real trainer, resume from the newest one -- unless
                         DLMCTL_FRESH=1 -- with metrics.jsonl cut back to that step
    FAKE_TRAINER_KILL_AT a step at which the trainer SIGKILLs itself, in its first
    FAKE_TRAINER_KILL_LIVES lives (default 1)
It also writes <output>/fake_env.json: the distributed environment it saw and its arguments, and
appends a line per start to <output>/fake_lives.jsonl: its pid, the step it starts from, DLMCTL_FRESH.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
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
    checkpoints = os.environ.get("FAKE_TRAINER_CHECKPOINTS") == "1"
    fresh = bool(os.environ.get("DLMCTL_FRESH"))  # the real trainer reads any value as a fresh start
    start = resume(args.output, fresh) if checkpoints else 0
    lives = record_life(args.output, start, fresh)
    kill_at = int(os.environ.get("FAKE_TRAINER_KILL_AT", "0"))
    kill_lives = int(os.environ.get("FAKE_TRAINER_KILL_LIVES", "1"))
    print(f"fake trainer: {run['name']} ({run['arm']}) for {steps} steps", flush=True)
    with open(args.output / "metrics.jsonl", "a") as metrics:
        def emit(event, **fields):
            metrics.write(event_line(build_event(event, **fields)))
            metrics.flush()

        for step in range(start + 1, steps + 1):
            if step == kill_at and lives <= kill_lives:
                print(f"fake trainer: killing myself at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if selected("FAKE_TRAINER_HANG"):
                print("hanging until killed", flush=True)
                while True:
                    time.sleep(0.1)
            if selected("FAKE_TRAINER_FAIL") and step > steps // 2:
                print("fake trainer: simulated failure", file=sys.stderr, flush=True)
                return int(os.environ.get("FAKE_TRAINER_FAIL_CODE", "3"))
            loss = base / step
            emit("train", step=step, total_steps=steps, epoch=epochs * step / steps,
                 tokens=step * batch * seq_len, train_loss=loss, lr=1e-3)
            print(f"step {step}/{steps} loss {loss:.3f}", flush=True)
            if checkpoints:
                folder = args.output / "checkpoints" / f"step-{step:08d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "manifest.json").write_text(json.dumps({"step": step}))
                emit("checkpoint", step=step, epoch=epochs * step / steps, uri=str(folder))
            time.sleep(pause)
        if not checkpoints:
            emit("checkpoint", step=steps, epoch=epochs, uri=str(args.output / "checkpoints" / f"step-{steps:08d}"))
        emit("eval", step=steps, total_steps=steps, epoch=epochs, tokens=steps * batch * seq_len,
             val_loss=base / steps + 0.1, val_loss_stderr=0.01)
        emit("done", step=steps, total_steps=steps, epoch=epochs, tokens=steps * batch * seq_len)
    print("fake trainer: done", flush=True)
    return 0


def resume(output: Path, fresh: bool) -> int:
    """The step of the newest complete checkpoint (0 if none, or if `fresh`); metrics.jsonl keeps the
    events up to it only (the steps after it are trained and logged again)."""
    done = [int(p.name.removeprefix("step-")) for p in (output / "checkpoints").glob("step-*")
            if (p / "manifest.json").is_file()]
    start = 0 if fresh else max(done, default=0)
    path = output / "metrics.jsonl"
    if path.exists():
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line).get("step", 0) <= start:
                    kept.append(line)
            except ValueError:
                continue
        path.write_text("".join(kept))
    return start


def record_life(output: Path, start: int, fresh: bool) -> int:
    """Append this start to fake_lives.jsonl; returns how many starts there have been, this one included."""
    with open(output / "fake_lives.jsonl", "a") as lives:
        lives.write(json.dumps({"pid": os.getpid(), "start": start, "fresh": fresh}) + "\n")
    return len((output / "fake_lives.jsonl").read_text().splitlines())


if __name__ == "__main__":
    sys.exit(main())
