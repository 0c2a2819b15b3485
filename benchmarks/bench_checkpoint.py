"""Checkpoint streaming to S3: upload throughput and the training stall per checkpoint.

Starts a local SeaweedFS (tests/s3server.py), stages realistic checkpoint files (a DeepSpeed model
file, ZeRO optimizer shards, sampler and RNG state; random bytes, so nothing compresses) and saves
them through CheckpointStore. The baseline, measured in the same run, is what a save costs anyway:
writing the same files to the local staging disk. Reported:

- `local_write_s`: writing the files locally (the baseline; median over the checkpoints);
- `stall_s`: time the training loop is blocked per checkpoint (staging_dir() wait + commit(); median);
- `stall_over_local_write`: the target ratio (small: training does not wait for the upload);
- `upload_MBps`: bytes / (commit -> manifest written), hashing and listing included;
- `backpressure`: back-to-back saves with a staging disk of 1.5 checkpoints: there training must
  wait, and the stall approaches the upload time (bounded disk instead of a full one);
- `restore_MBps`: download + sha256 check of the newest checkpoint (resume);
- `synchronous_save_s`: a naive save (write, then upload before training goes on), for contrast.

    python benchmarks/bench_checkpoint.py [--size-mb 128] [--checkpoints 3] [--check]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3server import SeaweedS3  # noqa: E402

from dlmctl.trainer.checkpoints import CheckpointStore, RetryPolicy  # noqa: E402


def checkpoint_layout(total_mb: int) -> dict[str, int]:
    """File sizes of a DeepSpeed ZeRO-2 checkpoint with 2 data-parallel shards: fp32 model states are
    ~1/4 of the bytes, optimizer states (master weights, Adam m and v) ~3/4."""
    total = total_mb << 20
    model, shard = total // 4, (total - total // 4) // 2
    return {
        "deepspeed/global_step/mp_rank_00_model_states.pt": model,
        "deepspeed/global_step/zero_pp_rank_0_mp_rank_00_optim_states.pt": shard,
        "deepspeed/global_step/zero_pp_rank_1_mp_rank_00_optim_states.pt": shard,
        "sampler.json": 2048,
        "rng.pt": 16 << 10,
    }


def write_files(folder: Path, layout: dict[str, int], blob: bytes) -> float:
    began = time.perf_counter()
    for rel, size in layout.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for offset in range(0, size, len(blob)):
                f.write(blob[: min(len(blob), size - offset)])
    return time.perf_counter() - began


def run_saves(store: CheckpointStore, layout, blob, checkpoints: int, train_seconds: float, first_step: int):
    """Save `checkpoints` times with `train_seconds` of 'training' between saves; per-save timings."""
    rows = []
    for i in range(checkpoints):
        step = first_step + i
        began = time.perf_counter()
        folder = store.staging_dir(step)
        waited = time.perf_counter() - began
        local_write = write_files(folder, layout, blob)
        began = time.perf_counter()
        future = store.commit(step, epoch=step / 100)
        commit_s = time.perf_counter() - began
        rows.append({"step": step, "local_write_s": local_write, "stall_s": waited + commit_s, "future": future})
        time.sleep(train_seconds)
    store.flush()
    for row in rows:
        row["info"] = row.pop("future").result()
    return rows


def summarize(rows, total_bytes: int, store: CheckpointStore) -> dict:
    local = statistics.median(r["local_write_s"] for r in rows)
    stall = statistics.median(r["stall_s"] for r in rows)
    save_s = store.stats["last_save_seconds"]
    return {
        "checkpoints": len(rows),
        "local_write_s": round(local, 4),
        "stall_s": round(stall, 4),
        "stall_max_s": round(max(r["stall_s"] for r in rows), 4),
        "stall_over_local_write": round(stall / local, 4),
        "commit_to_manifest_s": round(save_s, 3),
        "upload_MBps": round(total_bytes / 1e6 / save_s, 1),
        "retries": store.stats["retries"],
        "failed": store.stats["failed"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=128, help="bytes per checkpoint (MiB)")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--check", action="store_true", help="exit 1 if stall_over_local_write > 0.1")
    args = parser.parse_args()

    layout = checkpoint_layout(args.size_mb)
    total_bytes = sum(layout.values())
    blob = os.urandom(8 << 20)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    result = {"checkpoint_MB": round(total_bytes / 1e6, 1), "files": len(layout), "cpus": os.cpu_count()}
    server = SeaweedS3(work / "seaweedfs")
    try:
        server.start()
        os.environ.update(server.env())
        options = dict(registry=None, max_concurrency=args.max_concurrency,
                       retry=RetryPolicy(first_delay=0.2, max_delay=2.0, give_up_after=120))

        # 1. room on the staging disk, training between saves (the upload overlaps it)
        store = CheckpointStore(f"s3://{server.bucket}/bench/run-a", keep_last=2, staging_root=work / "staging-a",
                                max_staging_bytes=4 * total_bytes, **options)
        # training between saves lasts 1.2 uploads (measured by a first save), so the upload can overlap it
        began = time.perf_counter()
        warm = run_saves(store, layout, blob, 1, 0.0, first_step=1)
        upload_time = time.perf_counter() - began - warm[0]["local_write_s"]
        rows = run_saves(store, layout, blob, args.checkpoints, train_seconds=upload_time * 1.2, first_step=2)
        result["s3_streaming"] = summarize(rows, total_bytes, store)
        result["s3_streaming"]["train_seconds_between_saves"] = round(upload_time * 1.2, 2)

        # 2. restore: download + sha256 of the newest checkpoint
        began = time.perf_counter()
        info, folder = store.restore_latest(work / "restore")
        restore_s = time.perf_counter() - began
        result["restore_MBps"] = round(info.total_bytes / 1e6 / restore_s, 1)
        shutil.rmtree(folder)
        store.close()

        # 3. back-to-back saves, staging disk of 1.5 checkpoints: bounded disk -> training waits
        store = CheckpointStore(f"s3://{server.bucket}/bench/run-b", keep_last=2, staging_root=work / "staging-b",
                                max_staging_bytes=int(1.5 * total_bytes), **options)
        rows = run_saves(store, layout, blob, args.checkpoints, train_seconds=0.0, first_step=1)
        result["backpressure"] = summarize(rows, total_bytes, store)
        store.close()

        # 4. for contrast: a synchronous save (write, upload, and only then train on)
        sync = CheckpointStore(f"s3://{server.bucket}/bench/run-c", keep_last=1, staging_root=work / "staging-c",
                               **options)
        began = time.perf_counter()
        write_files(sync.staging_dir(1), layout, blob)
        sync.commit(1, 0.01).result()
        result["synchronous_save_s"] = round(time.perf_counter() - began, 3)
        sync.close()

        # 5. the same streaming save to a local path (file://), for reference
        local = CheckpointStore(work / "local-store", keep_last=2, staging_root=work / "staging-d",
                                max_staging_bytes=4 * total_bytes, **options)
        rows = run_saves(local, layout, blob, args.checkpoints, train_seconds=upload_time * 1.2, first_step=1)
        result["local_streaming"] = summarize(rows, total_bytes, local)
        local.close()
    finally:
        server.stop(grace=1.0)
        shutil.rmtree(work, ignore_errors=True)

    result["stall_over_local_write"] = result["s3_streaming"]["stall_over_local_write"]
    print(json.dumps(result, indent=2))
    if args.check and result["stall_over_local_write"] > 0.1:
        print("stall per checkpoint is more than 10% of the local write time", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
