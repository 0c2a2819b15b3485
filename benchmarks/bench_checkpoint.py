"""Checkpoint streaming to S3: upload throughput and the training stall per checkpoint.

Starts a local SeaweedFS (tests/s3server.py), stages realistic checkpoint files (a DeepSpeed model
file, ZeRO optimizer shards, sampler and RNG state; random bytes, so nothing compresses) and saves
them through CheckpointStore, the trainer's save path: training "runs" (sleeps) between saves. Saves
with nothing else going on measure the upload time U; then every round runs each scenario once, in a
random order (seeded):

- `room`: a save every 1.5 U, staging disk of 4 checkpoints: the upload overlaps training;
- `short_interval`: a save every 0.5 U (saves come faster than they upload), staging disk of 2
  checkpoints (DLMCTL_MAX_STAGING_BYTES): back-pressure, so training must wait; in steady state the
  stall approaches U - interval - local write (`expected_stall_s`) and a save lands every U;
- `short_interval_unbounded`: the same interval with no staging limit (the trainer's default): training
  never waits, the backlog of staged checkpoints (and the disk they fill) grows instead;
- `synchronous`: write, then upload before training goes on (the naive save), for contrast;
- `local_store`: the `room` schedule to a local path (file://), for reference;
- `restore`: download + sha256 check of the newest checkpoint (resume).

The baseline is what a save costs anyway: writing the same files to the local staging disk
(`local_write_s`, measured in every save). Per scenario and round: the median stall per save (steady
state only: after the staging disk filled), its ratio to that round's local write time, and CPU seconds
per checkpoint of this process (hashing, the S3 client) and of the S3 server. Reported: min and median
over the rounds. Results go to stdout, and to a JSON file only with --out.

    python benchmarks/bench_checkpoint.py [--size-mb 64] [--saves 6] [--rounds 3] [--check] [--out r.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3server import SeaweedS3  # noqa: E402

from dlmctl.trainer.checkpoint_store import CheckpointStore  # noqa: E402
from dlmctl.trainer.retries import RetryPolicy  # noqa: E402

ROOM_INTERVAL, SHORT_INTERVAL = 1.5, 0.5  # time between saves, in upload times


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


class CpuClock:
    """CPU seconds of this process (its upload threads included) and of the S3 server since `start()`."""

    def __init__(self, server: SeaweedS3):
        self.server = psutil.Process(server.process.pid)

    def _now(self) -> tuple[float, float]:
        t = self.server.cpu_times()
        return time.process_time(), t.user + t.system + t.children_user + t.children_system

    def start(self) -> None:
        self.began = self._now()

    def seconds(self) -> tuple[float, float]:
        now = self._now()
        return now[0] - self.began[0], now[1] - self.began[1]


def run_saves(store: CheckpointStore, layout, blob, saves: int, interval: float, first_step: int) -> list[dict]:
    """`saves` checkpoints with `interval` seconds of 'training' from the end of one save to the next;
    per save: the local write time, the stall (waiting for staging room + commit) and the backlog."""
    rows = []
    for i in range(saves):
        step = first_step + i
        began = time.perf_counter()
        folder = store.staging_dir(step)
        waited = time.perf_counter() - began
        local_write = write_files(folder, layout, blob)
        began = time.perf_counter()
        store.commit(step, epoch=step / 100)
        stall = waited + time.perf_counter() - began
        stats = store.stats
        rows.append({"local_write_s": local_write, "stall_s": stall,
                     "backlog": stats["committed"] - stats["saved"] - stats["failed"]})
        time.sleep(interval)
    store.flush()
    if store.stats["failed"]:
        raise SystemExit(f"a checkpoint upload failed: {store.stats['last_error']}")
    return rows


def scenario(name: str, server: SeaweedS3, work: Path, round_: int, layout, blob, args, upload_s: float,
             clock: CpuClock, options: dict) -> dict:
    total = sum(layout.values())
    uri = f"s3://{server.bucket}/bench/{name}-{round_}"
    clock.start()
    if name == "synchronous":
        store = CheckpointStore(uri, keep_last=1, staging_root=work / f"staging-{name}", **options)
        began = time.perf_counter()
        local_write = write_files(store.staging_dir(1), layout, blob)
        store.commit(1, 0.01).result()
        stall = time.perf_counter() - began
        store.close()
        cpu, server_cpu = clock.seconds()
        return {"stall_s": stall, "local_write_s": local_write, "stall_over_local_write": stall / local_write,
                "cpu_s_per_checkpoint": cpu, "server_cpu_s_per_checkpoint": server_cpu}
    if name == "restore":
        store = CheckpointStore(f"s3://{server.bucket}/bench/room-{round_}", keep_last=2,
                                staging_root=work / "staging-restore", **options)
        began = time.perf_counter()
        info, folder = store.restore_latest(work / "restore")
        seconds = time.perf_counter() - began
        shutil.rmtree(folder)
        store.close()
        cpu, server_cpu = clock.seconds()
        return {"restore_s": seconds, "restore_MBps": info.total_bytes / 1e6 / seconds, "cpu_s": cpu, "server_cpu_s": server_cpu}

    interval, staging = {"room": (ROOM_INTERVAL, 4), "local_store": (ROOM_INTERVAL, 4),
                         "short_interval": (SHORT_INTERVAL, 2),
                         "short_interval_unbounded": (SHORT_INTERVAL, None)}[name]
    store = CheckpointStore(work / f"store-{name}-{round_}" if name == "local_store" else uri, keep_last=2,
                            staging_root=work / f"staging-{name}",
                            max_staging_bytes=staging * total if staging else None, **options)
    rows = run_saves(store, layout, blob, args.saves, interval * upload_s, first_step=1)
    save_s = store.stats["last_save_seconds"]
    store.close()
    cpu, server_cpu = clock.seconds()
    # saving faster than uploading: once the staging disk is full, every save waits its turn
    steady = rows[staging:] if name == "short_interval" else rows
    local = statistics.median(r["local_write_s"] for r in rows)
    stall = statistics.median(r["stall_s"] for r in steady)
    result = {"interval_s": interval * upload_s, "local_write_s": local, "stall_s": stall,
              "stall_max_s": max(r["stall_s"] for r in rows), "stall_over_local_write": stall / local,
              "commit_to_manifest_s": save_s,  # of the last save: waiting behind a backlog included
              "backlog_checkpoints_max": max(r["backlog"] for r in rows),
              "cpu_s_per_checkpoint": cpu / len(rows), "server_cpu_s_per_checkpoint": server_cpu / len(rows)}
    if interval >= 1:  # nothing queued ahead of it: the upload itself
        result["upload_MBps"] = total / 1e6 / save_s
    if name == "short_interval":
        result["expected_stall_s"] = max(0.0, upload_s - interval * upload_s - local)
    return result


def calibrate(server: SeaweedS3, work: Path, layout, blob, options: dict, saves: int = 5, warm: int = 2) -> float:
    """The upload time U of a checkpoint (commit -> manifest) with nothing else going on: the median of
    `saves - warm` saves after `warm` that warm the server up (its first ones create volumes)."""
    seconds = []
    with CheckpointStore(f"s3://{server.bucket}/bench/calibrate", keep_last=1, staging_root=work / "staging-calibrate",
                         **options) as store:
        for step in range(1, saves + 1):
            write_files(store.staging_dir(step), layout, blob)
            store.commit(step, epoch=step / 100).result()
            seconds.append(store.stats["last_save_seconds"])
    return statistics.median(seconds[warm:])


SCENARIOS = ("room", "short_interval", "short_interval_unbounded", "synchronous", "local_store")


def spread(values) -> dict:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64, help="bytes per checkpoint (MiB)")
    parser.add_argument("--saves", type=int, default=6, help="checkpoints per scenario and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="of the order of the scenarios in each round")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the stall with room exceeds 10%% of the local write time, or the short "
                             "interval shows no back-pressure")
    args = parser.parse_args()

    layout = checkpoint_layout(args.size_mb)
    total_bytes = sum(layout.values())
    blob = os.urandom(8 << 20)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    server = SeaweedS3(work / "seaweedfs")
    rounds: list[dict] = []
    try:
        server.start()
        os.environ.update(server.env())
        options = dict(registry=None, max_concurrency=args.max_concurrency,
                       retry=RetryPolicy(first_delay=0.2, max_delay=2.0, give_up_after=120))
        clock = CpuClock(server)
        upload_s = calibrate(server, work, layout, blob, options)
        order = random.Random(args.seed)
        for round_ in range(args.rounds):
            names = list(SCENARIOS)
            order.shuffle(names)
            results = {name: scenario(name, server, work, round_, layout, blob, args, upload_s, clock, options)
                       for name in names}
            results["restore"] = scenario("restore", server, work, round_, layout, blob, args, upload_s, clock, options)
            rounds.append(results)
            print(f"round {round_ + 1}: " + ", ".join(f"{n} stall {r['stall_s']:.3f}s" for n, r in results.items()
                                                      if "stall_s" in r), file=sys.stderr, flush=True)
    finally:
        server.stop(grace=1.0)
        shutil.rmtree(work, ignore_errors=True)

    result = {"checkpoint_MB": round(total_bytes / 1e6, 1), "files": len(layout), "cpus": os.cpu_count(),
              "rounds": args.rounds, "saves_per_scenario": args.saves, "upload_s": round(upload_s, 3)}
    for name in [*SCENARIOS, "restore"]:
        keys = [k for k, v in rounds[0][name].items() if isinstance(v, (int, float))]
        result[name] = {k: spread([r[name][k] for r in rounds]) for k in keys}
    room, short = result["room"], result["short_interval"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"stall per checkpoint / local write: with room {room['stall_over_local_write']['median']:.3f} "
          f"(min {room['stall_over_local_write']['min']:.3f}); saving every {SHORT_INTERVAL} uploads: stall "
          f"{short['stall_s']['median']:.3f}s (expected {short['expected_stall_s']['median']:.3f}s, "
          f"{short['stall_over_local_write']['median']:.2f}x the local write); without a staging limit: "
          f"stall {result['short_interval_unbounded']['stall_s']['median']:.3f}s, backlog up to "
          f"{result['short_interval_unbounded']['backlog_checkpoints_max']['median']:.0f} checkpoints")
    if args.check:
        problems = []
        if room["stall_over_local_write"]["median"] > 0.1:
            problems.append("with room, the stall per checkpoint is more than 10% of the local write time")
        if short["stall_s"]["median"] < 0.5 * short["expected_stall_s"]["median"]:
            problems.append("saving faster than uploading shows no back-pressure")
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
