"""What a training checkpoint holds, and how the loop saves and resumes one through the CheckpointStore.

One checkpoint folder:
    ds/                      DeepSpeed: model, optimizer, LR scheduler (ZeRO shards, one file per rank)
    trainer_state.json       step, sampler state (samples consumed, pool fingerprint), world size
    rng/rank-<r>.pt          python, numpy, torch (and CUDA) RNG states of each rank (dropout);
                             the experiment's own randomness is keyed by (seed, step, sample), not kept here
    metrics.jsonl            rank 0's metrics events up to this step, so a run resumed on an empty disk
                             loses none even if the store's copy of the file lags behind
The store (one, on rank 0) uploads the folder in the background and writes its manifest last.

Next to the step folders, rank 0 keeps the run's own files in the store (a MetricsMirror): metrics.jsonl
(the local file's bytes, kept current), and run.json, tokenizer.json and data.json (put there once at
start), so a laptop can follow, sample and export a run whose pods have gone.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from dlmctl.spec import Run
from dlmctl.spec.contracts import METRICS_FILE
from dlmctl.spec.metrics import run_labels
from dlmctl.spec.files import write_atomically
from dlmctl.spec.settings import TrainerSettings, read

from .checkpoint_store import CheckpointStore
from .engine import World
from .manifest import CheckpointInfo
from .metrics import MetricsMirror, build_event, event_line, events_until, last_step
from .retries import RetryPolicy, retry_call
from .store_errors import (
    NoVerifiedCheckpoint, StagingSpaceError, StoreFailure, StoreUnavailable, describe, is_space_error, is_user_error,
    reason,
)

log = logging.getLogger("dlmctl.trainer")
DS_TAG = "ds"
STATE = "trainer_state.json"
DATA_FILES = ("tokenizer.json", "data.json")  # written by the trainer into its output; put into the store with run.json


class RunFailed(Exception):
    """Ends the run: `python -m dlmctl.trainer` prints `error: <message>` (one line, no traceback) and exits
    with `exit_code`: 2 for what a person must fix (spec, credentials, bucket, space, checkpoints that do
    not verify), which is not retried; 1 for the rest (an outage past the retry deadline), which may be."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code


def retry_deadline(run: Run) -> float:
    """How long the store may fail every request before the run gives up (spec.checkpoint)."""
    return float(run.spec.checkpoint.retry_deadline_seconds)


def fresh_token() -> Optional[str]:
    """$DLMCTL_FRESH (or --fresh): start over at step 0. Its value names that fresh start, so a restart of
    the same process (same value) resumes the fresh start's own checkpoints instead of starting again."""
    return read(TrainerSettings).fresh_token


def run_store_uri(run: Run, output: Path) -> str:
    """Every run of an experiment gets its own prefix under `spec.checkpoint.uri`."""
    base = run.spec.checkpoint.uri
    if base is None:
        return str((output / "checkpoints").resolve())
    return f"{base.rstrip('/')}/{run.name}"


def open_store(run: Run, output: Path, world: World, on_saved: Optional[Callable[[CheckpointInfo], None]] = None,
               registry=None) -> Optional[CheckpointStore]:
    """The store lives on rank 0 only: one writer per run URI. `on_saved(info)` is called (on the
    uploader thread) once a checkpoint's manifest is written. Its metrics go to `registry` (the one the
    run's TrainMetrics serves), with the run's labels."""
    if not world.is_main:
        return None
    c = run.spec.checkpoint
    try:
        return CheckpointStore(run_store_uri(run, output), keep_last=c.keep_last,
                               keep_every_epochs=c.keep_every_epochs, endpoint_url=c.endpoint_url,
                               staging_root=_staging_root(output), max_staging_bytes=_staging_limit(),
                               retry=RetryPolicy(give_up_after=retry_deadline(run)), labels=run_labels(run),
                               on_saved=on_saved, registry=registry)
    except OSError as exc:  # the staging directory cannot be created
        raise RunFailed(f"staging directory {_staging_root(output)} (DLMCTL_STAGING): {describe(exc)}") from None


def preflight(store: Optional[CheckpointStore], run: Run, world: World) -> None:
    """Before anything else: write, read back and delete a probe object in the store (rank 0), so a wrong
    credential, a missing or read-only bucket or an unreachable endpoint fails the run within seconds."""
    problem = None
    if store:
        try:
            took = store.preflight(min(read(TrainerSettings).preflight_seconds, retry_deadline(run)))
            log.info("checkpoint store %s: probe object written, read back and deleted in %.2fs", store.uri, took)
        except StoreFailure as exc:
            problem = f"spec.checkpoint: {exc}"
    problem = _broadcast(problem, world)
    if problem:
        raise RunFailed(problem, 2)


def store_failure(store: Optional[CheckpointStore], world: World) -> Optional[RunFailed]:
    """The store's failure, if any rank's store has one (only rank 0 has a store), as every rank's RunFailed.
    Collective: every rank calls it at the same point."""
    failure = store.failure if store else None
    code = 0 if failure is None else failure.exit_code
    if world.world_size > 1:
        value = torch.tensor(float(code), device=world.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        code = int(value.item())
    if not code:
        return None
    return RunFailed(_broadcast(str(failure) if failure else None, world) or "the checkpoint store failed", code)


def _staging_limit() -> Optional[int]:
    return read(TrainerSettings).max_staging_bytes


def check_staging_is_reachable(engine, world: World) -> None:
    """The one store on rank 0 uploads one staging folder. With ZeRO >= 1 every rank writes optimizer
    shards there, so on several nodes that folder must be a volume they share (DLMCTL_STAGING)."""
    if _own_disk(world) and engine.zero_optimization_stage() > 0:
        raise RunFailed(
            "spec.deepspeed.zero_stage: a multi-node run with ZeRO >= 1 checkpoints optimizer shards on "
            "every node; set DLMCTL_STAGING to a volume all nodes share, or use zero_stage 0"
        )


def save(store: Optional[CheckpointStore], engine, batches, step: int, world: World, metrics=None,
         loop_state: Optional[dict] = None) -> None:
    """Every rank writes its part of checkpoint `step`; rank 0 adds the trainer state (with `loop_state`, the
    loop's own JSON-able running values, returned by `resume` as `Resumed.loop_state`) and a copy of its
    metrics events (`metrics.snapshot(path)`) and commits the folder to the store. A staging disk too
    small for the checkpoint ends the run (RunFailed) with its size and the free space, and leaves no
    partial checkpoint behind."""
    need = (store.expected_bytes or estimate_checkpoint_bytes(engine)) if store else 0
    handed_out = None
    if store:
        try:
            handed_out = (str(store.staging_dir(step, need_bytes=need)), None)
        except StagingSpaceError as exc:
            handed_out = (None, str(exc))
    folder, problem = _broadcast(handed_out, world)
    if problem:
        raise RunFailed(problem, 2)
    error = None
    try:
        engine.save_checkpoint(folder, tag=DS_TAG, save_latest=False)
        rng = Path(folder) / "rng"
        rng.mkdir(exist_ok=True)
        torch.save(_rng_state(), rng / f"rank-{world.rank}.pt")
        if store:
            state = {"step": step, "world_size": world.world_size, "data": batches.state_dict(),
                     "loop": loop_state or {}}
            (Path(folder) / STATE).write_text(json.dumps(state))
            if metrics is not None:
                metrics.snapshot(Path(folder) / METRICS_FILE)
    except Exception as exc:  # a full disk shows up as torch's "file write failed", an OSError or others
        # Only a summary is kept: the traceback holds torch's open writer, whose deleted file fills the disk.
        error = _WriteError(is_space_error(exc), is_user_error(exc), reason(exc, local=True))
    if _any_rank_failed(error is not None, world):  # also: every rank's shards are on disk before the upload
        failed = _write_failed(store, step, Path(folder), error, need) if store else None
        message, code = _broadcast(failed, world) or (f"checkpoint step {step} could not be written on every rank", 1)
        raise RunFailed(message, code)
    if store:
        store.commit(step, batches.epoch_at(), folder)


def estimate_checkpoint_bytes(engine) -> int:
    """The size of one checkpoint before the first is written: the weights as trained plus AdamW's two
    fp32 moments, and fp32 master weights when training in a narrower type."""
    total = 0
    for p in engine.module.parameters():
        numel = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves partitioned parameters empty
        size = p.element_size()
        total += numel * (size + 8 + (4 if size < 4 else 0))
    return total


@dataclass(frozen=True)
class _WriteError:
    space: bool
    user: bool
    reason: str


def _write_failed(store: CheckpointStore, step: int, folder: Path, error: Optional[_WriteError],
                  need: int) -> tuple[str, int]:
    """Remove the half-written checkpoint; the one-line reason and exit code."""
    gc.collect()  # files torch left open are closed, so their space is free again
    written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    full = shutil.disk_usage(store.staging_root).free < max(1 << 20, need // 100)  # torch may only say "unexpected pos"
    store.discard(step, folder)
    shutil.rmtree(folder, ignore_errors=True)
    free = shutil.disk_usage(store.staging_root).free
    if error is None:
        return f"checkpoint step {step} could not be written on another rank", 1
    if error.space or full or free < max(need, written):
        return str(StagingSpaceError(step, max(need, written), free, store.staging_root)), 2
    return (f"checkpoint step {step} could not be written to the staging directory {store.staging_root}: "
            f"{error.reason}", 2 if error.user else 1)


def _any_rank_failed(flag: bool, world: World) -> bool:
    if world.world_size == 1:
        return flag
    value = torch.tensor(float(flag), device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@dataclass
class Resumed:
    """Where a run continues: `step` (0 for a fresh start), the checkpoint it resumed from, and on rank 0
    the metrics events that checkpoint was saved with (None when it has none)."""

    step: int = 0
    checkpoint: Optional[CheckpointInfo] = None
    events: Optional[bytes] = None
    loop_state: dict = field(default_factory=dict)


def resume(store: Optional[CheckpointStore], engine, batches, world: World, run: Run, output: Path) -> Resumed:
    """Load the newest verified checkpoint, if any; returns where to continue from.

    Rank 0 picks the checkpoint and downloads it; on other nodes (pods with their own disks) the first
    process of each node downloads the same one, so every rank reads it from a local folder."""
    folder = _staging_root(output) / "resume"
    chosen, info, problem = None, None, None
    if store:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            found = store.restore_latest(folder, fresh=fresh_token())
            chosen, info = (found[0].name, found[0]) if found else (None, None)
        except NoVerifiedCheckpoint as exc:
            problem = (f"spec.checkpoint.uri: {exc}", 2)
        except StoreUnavailable as exc:
            problem = (f"checkpoint store unreachable, cannot resume: {exc}", 1)
        except Exception as exc:
            if not is_user_error(exc):
                raise
            problem = (f"spec.checkpoint: {store.uri}: cannot resume: {reason(exc, local=store.location.is_local)}", 2)
    chosen, problem = _broadcast((chosen, problem), world)
    if problem:
        raise RunFailed(*problem)
    if chosen is None:
        return Resumed()
    if world.local_rank == 0 and not world.is_main and _own_disk(world):
        c = run.spec.checkpoint
        shutil.rmtree(folder, ignore_errors=True)
        with CheckpointStore(run_store_uri(run, output), keep_last=c.keep_last, endpoint_url=c.endpoint_url,
                             staging_root=_staging_root(output) / "reader", registry=None) as reader:
            reader.download(reader.verify(int(chosen.removeprefix("step-")), full=False), folder)
    if world.world_size > 1:
        dist.barrier()
    local = folder / chosen
    state = json.loads((local / STATE).read_text())
    if state["world_size"] != world.world_size and engine.zero_optimization_stage() > 0:
        raise RunFailed(
            f"checkpoint {chosen} was written by {state['world_size']} processes with ZeRO stage "
            f"{engine.zero_optimization_stage()}; resume it on the same world size (ZeRO stage 0 resumes on any)"
        )
    engine.load_checkpoint(str(local), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    batches.load_state_dict(state["data"])
    rng_file = local / "rng" / f"rank-{world.rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    events = (local / METRICS_FILE).read_bytes() if store and (local / METRICS_FILE).exists() else None
    if world.world_size > 1:
        dist.barrier()
    if world.local_rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    log.info("resumed from step %d (%s)", state["step"], chosen)
    return Resumed(state["step"], info, events, state.get("loop", {}))


def restore_metrics(store: CheckpointStore, path: Path, resumed: Resumed) -> None:
    """Rank 0, before this life of the run writes its first event: make `path` hold the run's events up
    to the step it resumes from and none after (those steps are trained and logged again).

    The events come from the first of these that reaches that step: the local file; the store's copy
    (a pod recreated on an empty disk); the copy saved in the checkpoint (the store's copy lagged behind
    a kill), followed by that checkpoint's own event."""
    step = resumed.step
    local = path.read_bytes() if path.exists() else None
    chosen = local if local is not None and last_step(local) >= step else None
    if chosen is None:
        stored = _read_or_none(store, METRICS_FILE)
        candidates = [data for data in (stored, resumed.events, local) if data is not None]
        chosen = next((data for data in candidates if last_step(data) >= step),
                      max(candidates, key=last_step, default=b""))
        if chosen is resumed.events and resumed.checkpoint is not None:
            c = resumed.checkpoint
            chosen += event_line(build_event("checkpoint", time=c.created, step=c.step, epoch=c.epoch,
                                             uri=c.uri)).encode()
        if chosen and chosen is not local:
            log.info("metrics events up to step %d restored from %s", step,
                     f"{store.uri}/{METRICS_FILE}" if chosen is stored else "the checkpoint")
    kept = events_until(chosen or b"", step)
    if kept != local and (kept or local is not None):
        write_atomically(path, kept)


def mirror_run(store: CheckpointStore, run: Run, output: Path) -> MetricsMirror:
    """Start keeping `<store>/metrics.jsonl` current and put the run's files there (see the module doc)."""
    once = {"run.json": run.model_dump_json().encode()}
    once.update({name: (output / name).read_bytes() for name in DATA_FILES if (output / name).is_file()})
    return MetricsMirror(output / METRICS_FILE, store.location, retry=store.retry, name=METRICS_FILE,
                         interval=read(TrainerSettings).metrics_upload_seconds, once=once)


def _read_or_none(store: CheckpointStore, name: str) -> Optional[bytes]:
    loc = store.location
    try:
        return retry_call(lambda: loc.read_bytes(loc.path(name)), what=f"reading {name}", policy=store.retry)
    except FileNotFoundError:
        return None
    except Exception as exc:  # the copy in the checkpoint stands in for it
        log.warning("%s/%s not read: %s", store.uri, name, describe(exc))
        return None


def _staging_root(output: Path) -> Path:
    return read(TrainerSettings).staging or output / ".staging"


def _own_disk(world: World) -> bool:
    """Several nodes without a shared staging volume: each node needs its own copy of a checkpoint."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # unset: one process per pod, no torchrun
    return local_world < world.world_size and read(TrainerSettings).staging is None


def _broadcast(value, world: World):
    if world.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
