"""What a training checkpoint holds, and how the loop saves and resumes one through the CheckpointStore.

One checkpoint folder:
    ds/                      DeepSpeed: model, optimizer, LR scheduler (ZeRO shards, one file per rank)
    trainer_state.json       step, sampler state (samples consumed, pool fingerprint), world size
    rng/rank-<r>.pt          python, numpy, torch (and CUDA) RNG states of each rank (dropout);
                             the experiment's own randomness is keyed by (seed, step, sample), not kept here
The store (one, on rank 0) uploads the folder in the background and writes its manifest last.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from dlmctl.spec import Run

from .checkpoints import CheckpointStore
from .engine import World

log = logging.getLogger("dlmctl.trainer")
DS_TAG = "ds"
STATE = "trainer_state.json"


def run_store_uri(run: Run, output: Path) -> str:
    """Every run of an experiment gets its own prefix under `spec.checkpoint.uri`."""
    base = run.spec.checkpoint.uri
    if base is None:
        return str((output / "checkpoints").resolve())
    return f"{base.rstrip('/')}/{run.name}"


def open_store(run: Run, output: Path, world: World) -> Optional[CheckpointStore]:
    """The store lives on rank 0 only: one writer per run URI."""
    if not world.is_main:
        return None
    c = run.spec.checkpoint
    return CheckpointStore(run_store_uri(run, output), keep_last=c.keep_last, keep_every_epochs=c.keep_every_epochs,
                           endpoint_url=c.endpoint_url, staging_root=_staging_root(output),
                           max_staging_bytes=_staging_limit(), experiment=run.experiment, run=run.name)


def _staging_limit() -> Optional[int]:
    value = os.environ.get("DLMCTL_MAX_STAGING_BYTES")
    return int(value) if value else None


def check_staging_is_reachable(engine, world: World) -> None:
    """The one store on rank 0 uploads one staging folder. With ZeRO >= 1 every rank writes optimizer
    shards there, so on several nodes that folder must be a volume they share (DLMCTL_STAGING)."""
    if _own_disk(world) and engine.zero_optimization_stage() > 0:
        raise SystemExit(
            "error: spec.deepspeed.zero_stage: a multi-node run with ZeRO >= 1 checkpoints optimizer shards on "
            "every node; set DLMCTL_STAGING to a volume all nodes share, or use zero_stage 0"
        )


def save(store: Optional[CheckpointStore], engine, batches, step: int, world: World) -> None:
    folder = _broadcast(str(store.staging_dir(step)) if store else None, world)
    engine.save_checkpoint(folder, tag=DS_TAG, save_latest=False)
    rng = Path(folder) / "rng"
    rng.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng / f"rank-{world.rank}.pt")
    if world.world_size > 1:
        dist.barrier()  # every rank's shards are on disk before the upload starts
    if store:
        state = {"step": step, "world_size": world.world_size, "data": batches.state_dict()}
        (Path(folder) / STATE).write_text(json.dumps(state))
        store.commit(step, batches.epoch_at(), folder)


def resume(store: Optional[CheckpointStore], engine, batches, world: World, run: Run, output: Path) -> int:
    """Load the newest verified checkpoint, if any; returns the step to continue from.

    Rank 0 picks the checkpoint and downloads it; on other nodes (pods with their own disks) the first
    process of each node downloads the same one, so every rank reads it from a local folder."""
    folder = _staging_root(output) / "resume"
    chosen = None
    if store:
        shutil.rmtree(folder, ignore_errors=True)
        found = store.restore_latest(folder)
        chosen = found[0].name if found else None
    chosen = _broadcast(chosen, world)
    if chosen is None:
        return 0
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
        raise SystemExit(
            f"error: checkpoint {chosen} was written by {state['world_size']} processes with ZeRO stage "
            f"{engine.zero_optimization_stage()}; resume it on the same world size (ZeRO stage 0 resumes on any)"
        )
    engine.load_checkpoint(str(local), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    batches.load_state_dict(state["data"])
    rng_file = local / "rng" / f"rank-{world.rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    if world.world_size > 1:
        dist.barrier()
    if world.local_rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    log.info("resumed from step %d (%s)", state["step"], chosen)
    return state["step"]


def _staging_root(output: Path) -> Path:
    return Path(os.environ.get("DLMCTL_STAGING", output / ".staging"))


def _own_disk(world: World) -> bool:
    """Several nodes without a shared staging volume: each node needs its own copy of a checkpoint."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # unset: one process per pod, no torchrun
    return local_world < world.world_size and "DLMCTL_STAGING" not in os.environ


def export(run: Run, model, data, store: Optional[CheckpointStore], output: Path) -> str:
    """Final weights to `<run dir>/export` and, for a remote checkpoint URI, to `<uri>/export/`."""
    from .checkpoints import write_export
    from .export import save_export

    files = save_export(model, data.tokenizer, run, output / "export")
    if store and not store.location.is_local:
        return write_export(store.uri, files, endpoint_url=run.spec.checkpoint.endpoint_url)
    return str(output / "export")


def load_weights_from_latest(run: Run, output: Path):
    """The model and tokenizer of a run's newest verified checkpoint, outside any training job."""
    from .export import load_export
    from .loop import build_model
    from .tokenizer import Tokenizer

    if (output / "export" / "config.json").exists():
        model, tokenizer, _ = load_export(output / "export")
        return model, tokenizer
    store = CheckpointStore(run_store_uri(run, output), endpoint_url=run.spec.checkpoint.endpoint_url,
                            keep_last=run.spec.checkpoint.keep_last, registry=None)
    with tempfile.TemporaryDirectory() as tmp, store:
        found = store.restore_latest(tmp)
        if not found:
            raise FileNotFoundError(f"{store.uri}: no verified checkpoint yet")
        tokenizer = Tokenizer.load(output / "tokenizer.json")
        model = build_model(run, tokenizer.vocab_size)
        states = torch.load(next((found[1] / DS_TAG).glob("mp_rank_00_model_states.pt")), weights_only=False)
        model.load_state_dict(states["module"])
    return model.eval(), tokenizer


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
