"""Helpers to launch the real trainer on tiny runs, in 1 or N processes, and read what it wrote."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from dlmctl.spec import experiment_from_dict
from testenv.cluster import free_port

TINY = {
    "model": {"preset": "nano"},
    "data": {"train": "builtin:python-stdlib", "unique_tokens": 8192, "epochs": 2, "seq_len": 32,
             "validation_tokens": 2048, "tokenizer": {"kind": "bpe", "vocab_size": 512}},
    "optimizer": {"lr": 3e-3},
    "schedule": {"kind": "cosine", "warmup_fraction": 0.1},
    "batch": {"global_sequences": 16, "micro_batch_sequences": 4},
    "eval": {"interval_steps": 1000, "batches": 1, "elbo_samples": 1, "mc_samples": 2,
             "choice_task": {"examples": 4, "choices": 2, "context_tokens": 8, "continuation_tokens": 4}},
    "checkpoint": {"interval_steps": 4, "keep_last": 2},
    "metrics": {"port": 0, "log_interval_steps": 1},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def tiny_run(arm: str = "diffusion", name: str = "t", **overrides):
    spec = merge(TINY, overrides)
    spec["arms"] = [arm]
    return experiment_from_dict({"metadata": {"name": name}, "spec": spec}).runs()[0]


def launch(run, output: Path, *, processes: int = 1, env: dict | None = None, wait: bool = True, timeout=600):
    """The trainer as the local backend starts it: torchrun with the run in DLMCTL_RUN_SPEC."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "dlmctl.trainer", "--output", str(output)]
    full_env = {**os.environ, "DLMCTL_RUN_SPEC": run.model_dump_json(), "OMP_NUM_THREADS": "1", **(env or {})}
    output.mkdir(parents=True, exist_ok=True)
    log = open(output.parent / f"{output.name}.log", "ab")
    proc = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if wait:
        code = proc.wait(timeout=timeout)
        assert code == 0, f"trainer failed ({code}):\n{(output.parent / f'{output.name}.log').read_text()[-4000:]}"
    return proc


def trains_and_learns(run, output: Path) -> dict:
    """Train `run` to the end: every step reports once and the loss falls by more than half a nat. Returns
    the final evaluation event."""
    launch(run, output)
    curve = losses(output)
    steps = run.spec.total_steps
    assert sorted(curve) == list(range(1, steps + 1))
    assert curve[steps] < curve[1] - 0.5, "the loss falls"
    [final_eval] = events(output, "eval")
    assert final_eval["step"] == steps and math.isfinite(final_eval["val_loss"])
    return final_eval


def start_pods(run, outputs: list[Path]) -> list[subprocess.Popen]:
    """One trainer process per pod, as a PyTorchJob without torchrun runs them: each is told only
    MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK, and has its own output folder (its own disk)."""
    port = free_port()
    pods = []
    for rank, output in enumerate(outputs):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(len(outputs)), RANK=str(rank),
                   DLMCTL_RUN_SPEC=run.model_dump_json(), OMP_NUM_THREADS="1")
        log = open(output.parent / f"{output.name}.log", "ab")
        pods.append(subprocess.Popen([sys.executable, "-m", "dlmctl.trainer", "--output", str(output)], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return pods


def wait_for_pods(pods: list[subprocess.Popen], outputs: list[Path], timeout=600) -> None:
    for pod, output in zip(pods, outputs):
        code = pod.wait(timeout=timeout)
        assert code == 0, f"pod failed ({code}):\n{(output.parent / f'{output.name}.log').read_text()[-3000:]}"


def kill_tree(pid: int) -> None:
    """kill -9 a launcher and every process below it at once (torchrun starts its workers in sessions of
    their own, so a process-group signal would miss them)."""
    from dlmctl.cli.backends.local_state import descendants

    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def events(output: Path, kind: str) -> list[dict]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def losses(output: Path) -> dict[int, float]:
    return {e["step"]: e["train_loss"] for e in events(output, "train")}


def wait_until(proc, condition, timeout=300):
    """Poll `condition` while the trainer process `proc` runs; fail if it ends first or time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the trainer ended before the awaited moment"
        assert time.monotonic() < deadline, "the awaited moment never came"
        time.sleep(0.05)


def step_tokens(batches, step: int, world: int, micro_batch: int, global_batch: int) -> np.ndarray:
    """Every sequence of one step of a sampler (fixed or re-packed), gathered from all ranks and micro-steps,
    in sample order: what a layout-invariance test compares between world sizes."""
    rows = {}
    for rank in range(world):
        for micro_step in range(global_batch // (micro_batch * world)):
            tokens, samples = batches.batch(step, micro_step, rank, world, micro_batch, global_batch)
            rows.update(zip(samples.tolist(), tokens.numpy()))
    return np.stack([rows[k] for k in sorted(rows)])
