"""The checkpoint store: staged locally, streamed to S3 (or a local path) in the background, verified on resume.

Layout under the run's checkpoint URI:

    step-00001200/<whatever the trainer staged>   DeepSpeed dir, sampler state, RNG states ...
    step-00001200/manifest.json                   written LAST: every file with size and sha256
    latest                                        "step-00001200", rewritten only after that manifest
    export/                                       final weights (transfer.write_export)

A checkpoint exists only once its manifest exists and every listed file matches it. Resume scans the
step folders newest first and takes the first that verifies; `latest` is a pointer for people and
tools, never trusted on its own, so a pointer that runs ahead of the files cannot mislead a resume.

Before the first step the trainer calls `preflight()`: a probe object is written, read back and
deleted, so wrong credentials, a missing bucket, a read-only bucket or an unreachable endpoint end the
run at once (StoreFailure) instead of after hours of training.

Saving: `staging_dir(step, need_bytes)` hands out a local folder (waiting first if the staging disk is
full; StagingSpaceError if even an empty staging disk is too small for one checkpoint), the trainer
writes into it, `commit(step, epoch)` queues it and returns. One uploader thread takes checkpoints in
order; the files of a checkpoint are hashed and uploaded `max_concurrency` at a time, each retried with
exponential backoff and jitter on transient errors (connection refused, timeouts, 5xx) for up to the
retry deadline, while the store reports itself unreachable and since when (log, `stats`, the
`dlm_checkpoint_store_unreachable_since_timestamp_seconds` gauge). Then: sizes checked against a
listing, manifest written, `latest` updated, `on_saved(info)` called (the moment the checkpoint
exists), retention applied, staging copy deleted. A checkpoint that cannot be uploaded is counted,
logged and set on its Future, never raised into the training loop; its partial folder is removed and
the next one starts afresh. A permanent error (access denied, no such bucket, no space left) or an
outage past the deadline also sets `failure`, which the training loop polls to end the run with that
reason. Only one writer (one store, on the main rank) per run URI.

Generations: `restore_latest(dest, fresh=token)` starts a new generation instead of resuming (an
explicit fresh start). Manifests carry their generation (and the fresh-start token); resume only
considers the newest generation, so the checkpoints of an earlier start are never resumed again, yet
they stay in the store until this generation's first checkpoint exists (one in the way of that first
upload is moved under `superseded/`); retention then deletes them. When checkpoints of the current
generation exist but none verifies, resume raises NoVerifiedCheckpoint naming them, never a silent
start from step 0.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, TypeVar

from dlmctl.spec.metrics import (
    CHECKPOINT_FAILURES, CHECKPOINT_LAST_SUCCESS, CHECKPOINT_METRICS, CHECKPOINT_RETRIES, CHECKPOINT_SAVE_DURATION,
    CHECKPOINT_STAGED_BYTES, CHECKPOINT_STALL, CHECKPOINT_UNREACHABLE_SINCE, CHECKPOINT_UPLOAD_BYTES, RUN_LABELS,
    register,
)

from .manifest import (
    FRESH, MANIFEST, STEP_DIR, CheckpointInfo, FileEntry, encode, generation_of, info_from_manifest, new_manifest,
    parse_manifest, step_dir_name,
)
from .retries import RetryPolicy, retry_call
from .storage import Location, open_location
from .store_errors import (
    CheckpointInvalid, CheckpointUploadError, NoVerifiedCheckpoint, RetryDeadlinePassed, StagingSpaceError,
    StoreFailure, StoreUnavailable, UploadAbandoned, describe, is_user_error, reason,
)
from .transfer import in_background, local_files, run_parallel, sha256_file, sha256_remote

log = logging.getLogger("dlmctl.checkpoints")

LATEST = "latest"
SUPERSEDED = "superseded"  # step folders of an earlier generation that were in the way of a fresh start's upload
PROBE_PREFIX = ".dlmctl-probe-"

T = TypeVar("T")


def _clock(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


# --- metrics -----------------------------------------------------------------------------------

_METRICS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()
_DEFAULT_REGISTRY = object()


def _collectors(registry) -> dict:
    """The collectors of `spec.metrics.CHECKPOINT_METRICS` in `registry`: registered once per registry, then
    labelled per store (several stores of different runs may share one registry)."""
    with _METRICS_LOCK:
        if registry not in _METRICS:
            _METRICS[registry] = {m: register(m, registry) for m in CHECKPOINT_METRICS}
        return _METRICS[registry]


@dataclass
class _Job:
    step: int
    epoch: float
    staging: Path
    owned: bool  # inside the staging root: deleted once uploaded
    size: int
    metadata: dict
    committed_at: float
    future: concurrent.futures.Future
    cleared: bool = False  # the step folder holds no checkpoint any more: a failed upload may delete it


class CheckpointStore:
    """Checkpoints of one run at `uri`. See the module docstring for the layout and the save path."""

    def __init__(
        self,
        uri: str | os.PathLike,
        *,
        keep_last: int = 3,
        keep_every_epochs: Optional[float] = None,
        endpoint_url: Optional[str] = None,
        staging_root: str | Path | None = None,
        max_staging_bytes: Optional[int] = None,
        max_concurrency: int = 4,
        retry: RetryPolicy = RetryPolicy(),
        orphan_grace_seconds: float = 3600.0,
        registry=_DEFAULT_REGISTRY,
        labels: Mapping[str, str] = {},
        location: Optional[Location] = None,
        on_saved: Optional[Callable[[CheckpointInfo], None]] = None,
    ):
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        if keep_every_epochs is not None and keep_every_epochs <= 0:
            raise ValueError("keep_every_epochs must be > 0")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.location = location or open_location(uri, endpoint_url=endpoint_url)
        self.uri = self.location.uri
        self.keep_last = keep_last
        self.keep_every_epochs = keep_every_epochs
        self.max_staging_bytes = max_staging_bytes
        self.max_concurrency = max_concurrency
        self.retry = retry
        self.orphan_grace_seconds = orphan_grace_seconds
        self.on_saved = on_saved  # called on the uploader thread once a manifest is written; must not block long
        if staging_root is None:
            digest = hashlib.sha1(self.uri.encode()).hexdigest()[:16]
            staging_root = Path(tempfile.gettempdir()) / "dlmctl-staging" / digest
        self.staging_root = Path(staging_root)
        self.staging_root.mkdir(parents=True, exist_ok=True)
        for leftover in self.staging_root.glob("step-*"):  # a killed process's half-written or unuploaded saves
            shutil.rmtree(leftover, ignore_errors=True)

        if registry is _DEFAULT_REGISTRY:
            from prometheus_client import REGISTRY as registry
        elif registry is None:
            from prometheus_client import CollectorRegistry
            registry = CollectorRegistry()  # counted, not exported
        series = {m: c.labels(**{k: labels.get(k, "") for k in RUN_LABELS}) for m, c in _collectors(registry).items()}
        self._save_duration, self._stall = series[CHECKPOINT_SAVE_DURATION], series[CHECKPOINT_STALL]
        self._upload_bytes, self._last_success = series[CHECKPOINT_UPLOAD_BYTES], series[CHECKPOINT_LAST_SUCCESS]
        self._retries, self._failures = series[CHECKPOINT_RETRIES], series[CHECKPOINT_FAILURES]
        self._staged_bytes = series[CHECKPOINT_STAGED_BYTES]
        self._unreachable_gauge = series[CHECKPOINT_UNREACHABLE_SINCE]

        self._cond = threading.Condition()
        self._pending_bytes = 0
        self._unfinished = 0
        self._expected_bytes = 0  # size of the last checkpoint: the room staging_dir() waits for
        self._wait_before_write = 0.0
        self._staging_seq = 0
        self._staged: dict[int, Path] = {}  # step -> folder handed out by staging_dir()
        self._newest_uploaded = -1
        self._manifests: dict[str, dict] = {}  # step folder name -> parsed manifest (ours and ones read)
        self._stats = {"committed": 0, "saved": 0, "failed": 0, "retries": 0, "uploaded_bytes": 0,
                       "last_stall_seconds": 0.0, "max_stall_seconds": 0.0, "total_stall_seconds": 0.0,
                       "last_save_seconds": None, "last_saved_step": None, "last_error": None,
                       "unreachable_since": None}
        self._unreachable_since: Optional[float] = None  # wall time of the first failure of the current outage
        self._unreachable_reported = 0.0
        self._failure: Optional[StoreFailure] = None
        self.generation = 0  # of the checkpoints this store writes (see restore_latest)
        self.fresh_token: Optional[str] = None
        self._abort = threading.Event()
        self._closed = False
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._thread = threading.Thread(target=self._uploader, name="ckpt-uploader", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r}, keep_last={self.keep_last}, keep_every_epochs={self.keep_every_epochs})"

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- saving ---------------------------------------------------------------------------------

    def staging_dir(self, step: int, need_bytes: Optional[int] = None) -> Path:
        """An empty local folder for the trainer to write checkpoint `step` into. Blocks while the
        staged-but-not-uploaded bytes plus the size of the last checkpoint would exceed
        `max_staging_bytes` (the wait is part of the stall of this checkpoint). With `need_bytes` (the
        checkpoint's expected size) it also waits for pending uploads while the staging disk has less room
        than that, and raises StagingSpaceError if it still has less once nothing is pending."""
        began = time.monotonic()
        with self._cond:
            while (self.max_staging_bytes is not None and self._pending_bytes > 0 and not self._closed
                   and self._pending_bytes + self._expected_bytes > self.max_staging_bytes):
                self._cond.wait()
        if need_bytes:
            self._wait_for_room(step, need_bytes)
        self._wait_before_write += time.monotonic() - began
        self._staging_seq += 1  # never the folder of an upload still running, even for the same step
        folder = self.staging_root / f"{step_dir_name(step)}.{self._staging_seq}"
        folder.mkdir(parents=True)
        self._staged[step] = folder
        return folder

    def _wait_for_room(self, step: int, need: int) -> None:
        if _free_bytes(self.staging_root) >= need:
            return
        with self._cond:  # staged copies of uploads in flight are deleted once uploaded
            self._cond.wait_for(lambda: self._unfinished == 0 or self._closed)
        free = _free_bytes(self.staging_root)
        if free < need:
            raise StagingSpaceError(step, need, free, self.staging_root)

    @property
    def expected_bytes(self) -> int:
        """The size of the last checkpoint committed (0 before the first)."""
        return self._expected_bytes

    def discard(self, step: int, folder: str | Path | None = None) -> None:
        """Forget and delete what was staged for `step` (a save that failed half-way)."""
        staged = self._staged.pop(step, None)
        for path in {p for p in (staged, Path(folder) if folder else None) if p is not None}:
            if path.resolve().parent == self.staging_root.resolve():
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, step: int, epoch: float, staging_dir: str | Path | None = None,
               metadata: Optional[Mapping] = None) -> concurrent.futures.Future:
        """Queue the staged checkpoint for upload and return at once with a Future of its
        CheckpointInfo. Never raises for storage trouble: failures are logged, counted and set on the
        Future. Blocks only if this checkpoint pushed the staging disk past `max_staging_bytes`, until
        older uploads make room."""
        began = time.monotonic()
        if self._closed:
            raise RuntimeError("commit() on a closed CheckpointStore")
        folder = self._staged.pop(step, None)
        folder = Path(staging_dir) if staging_dir is not None else folder
        if folder is None or not folder.is_dir():
            raise FileNotFoundError(f"nothing staged for step {step}: write into staging_dir({step}) first")
        owned = folder.resolve().parent == self.staging_root.resolve()
        size = sum(size for _, _, size in local_files(folder))
        job = _Job(step=step, epoch=float(epoch), staging=folder, owned=owned, size=size,
                   metadata=dict(metadata or {}), committed_at=time.monotonic(), future=concurrent.futures.Future())
        with self._cond:
            self._pending_bytes += size
            self._unfinished += 1
            self._expected_bytes = size
            self._staged_bytes.set(self._pending_bytes)
            self._stats["committed"] += 1
            self._queue.put(job)
            while (self.max_staging_bytes is not None and self._pending_bytes > self.max_staging_bytes
                   and self._pending_bytes > size and not self._closed):
                self._cond.wait()
            stall = self._wait_before_write + time.monotonic() - began
            self._wait_before_write = 0.0
            self._stats["last_stall_seconds"] = stall
            self._stats["max_stall_seconds"] = max(self._stats["max_stall_seconds"], stall)
            self._stats["total_stall_seconds"] += stall
        self._stall.observe(stall)
        log.info("checkpoint step %d queued for upload to %s (%.1f MB staged, training blocked %.3fs)",
                 step, self.uri, size / 1e6, stall)
        return job.future

    def flush(self, timeout: Optional[float] = None, *, until_failure: bool = False) -> bool:
        """Wait until every committed checkpoint is uploaded or has failed. False on timeout, and with
        `until_failure` as soon as the store has a `failure` (the rest would only fail after it)."""
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._unfinished == 0 or (until_failure and self._failure is not None), timeout)
            return done and self._unfinished == 0

    def close(self, timeout: Optional[float] = None) -> bool:
        """flush(timeout), then stop the uploader; uploads still running after the timeout are abandoned
        (their folders have no manifest, so they never count as checkpoints)."""
        if self._closed:
            return True
        done = self.flush(timeout)
        if not done:
            self._abort.set()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._queue.put(None)
        self._thread.join(None if done else 5.0)
        return done

    @property
    def stats(self) -> dict:
        """Counts and timings of this store (a copy): committed, saved, failed, retries, uploaded_bytes,
        pending_bytes, last/max/total_stall_seconds, last_save_seconds, last_saved_step, last_error."""
        with self._cond:
            return dict(self._stats, pending_bytes=self._pending_bytes)

    @property
    def failure(self) -> Optional[StoreFailure]:
        """Set once an upload failed for good: a permanent error (exit code 2 for access denied, a missing
        bucket, no space) or an outage past the retry deadline (exit code 1). The trainer ends the run."""
        return self._failure

    @property
    def unreachable_since(self) -> Optional[float]:
        """Unix time since which every request to the store has failed; None while it answers."""
        return self._unreachable_since

    def preflight(self, budget: float = 10.0) -> float:
        """Write, read back and delete a small probe object; the seconds it took. StoreFailure (exit code
        2) with one clear sentence for wrong or missing credentials, a missing bucket, a bucket this
        identity may not write to, no space, or an endpoint that does not answer within `budget` seconds."""
        began = time.monotonic()
        loc = self.location
        path = loc.path(f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        data = f"dlmctl checkpoint store probe {time.time():.3f}".encode()
        policy = RetryPolicy(first_delay=0.25, max_delay=2.0, give_up_after=budget)

        def call(fn, what):
            return retry_call(fn, what=what, policy=policy, on_retry=self._count_retry, abort=self._abort)

        doing = "writing"
        try:
            call(lambda: loc.write_bytes(path, data), f"writing {self.uri}/{path.rsplit('/', 1)[-1]}")
            doing = "reading back"
            back = call(lambda: loc.read_bytes(path), "reading the probe object back")
            doing = "deleting"
            call(lambda: loc.remove_file(path), "deleting the probe object")
        except RetryDeadlinePassed as exc:
            endpoint = getattr(loc.fs, "endpoint_url", None)
            raise StoreFailure(f"{self.uri}: the store is unreachable{f' at {endpoint}' if endpoint else ''} "
                               f"(no answer for {exc.failing_for:.0f}s: {describe(exc.__cause__ or exc)})") from None
        except Exception as exc:
            if doing != "writing":
                self._remove_quietly(path)
            raise StoreFailure(f"{self.uri}: {doing} a probe object failed: {self._diagnose(exc)}") from None
        if back != data:
            raise StoreFailure(f"{self.uri}: a probe object read back differs from what was written "
                               f"({len(back)} bytes, not {len(data)})")
        return time.monotonic() - began

    def _diagnose(self, exc: BaseException) -> str:
        loc = self.location
        if not loc.is_local and isinstance(exc, (PermissionError, FileNotFoundError)):
            bucket = loc.root.split("/", 1)[0]
            try:
                loc.fs.ls(bucket)
            except FileNotFoundError:  # some servers answer AccessDenied to a write into a missing bucket
                endpoint = getattr(loc.fs, "endpoint_url", None)
                return f"bucket {bucket!r} does not exist{f' at {endpoint}' if endpoint else ''} ({describe(exc)})"
            except Exception:
                pass
        return reason(exc, local=loc.is_local)

    def _remove_quietly(self, path: str) -> None:
        try:
            self.location.remove_file(path)
        except Exception:
            pass

    def _uploader(self) -> None:
        while (job := self._queue.get()) is not None:
            info, error = None, None
            try:
                info = self._upload(job)
            except Exception as exc:
                error = exc
                self._failures.inc()
                failure = self._failure_of(job, exc)
                with self._cond:
                    self._stats["failed"] += 1
                    self._stats["last_error"] = describe(exc)
                    if failure is not None and self._failure is None:
                        self._failure = failure
                log.error("checkpoint step %d NOT saved to %s: %s", job.step, self.uri, describe(exc))
                if job.cleared and not isinstance(exc, UploadAbandoned):  # no manifest: free the space
                    try:
                        self.location.remove_tree(self.location.path(step_dir_name(job.step)))
                    except Exception:
                        pass
            if job.owned:
                shutil.rmtree(job.staging, ignore_errors=True)
            if error is None:
                job.future.set_result(info)
            else:
                job.future.set_exception(error)
            with self._cond:
                self._pending_bytes -= job.size
                self._unfinished -= 1
                self._staged_bytes.set(self._pending_bytes)
                self._cond.notify_all()

    def _failure_of(self, job: _Job, exc: BaseException) -> Optional[StoreFailure]:
        if isinstance(exc, UploadAbandoned):
            return None
        if isinstance(exc, RetryDeadlinePassed):
            deadline = self.retry.give_up_after or exc.failing_for
            since = min(exc.since, self._unreachable_since or exc.since)
            return StoreFailure(
                f"checkpoint store {self.uri} unreachable since {_clock(since)} ({time.time() - since:.0f}s, the retry "
                f"deadline is {deadline:.0f}s): checkpoint step {job.step} not saved: {describe(exc.__cause__ or exc)}",
                exit_code=1)
        why = reason(exc, local=self.location.is_local)
        return StoreFailure(f"checkpoint step {job.step} not saved to {self.uri}: {why}",
                            exit_code=2 if is_user_error(exc) else 1)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return retry_call(fn, what=what, policy=self.retry, on_retry=self._count_retry, abort=self._abort,
                          on_failure=self._unreachable, on_success=self._reachable)

    def _count_retry(self) -> None:
        self._retries.inc()
        with self._cond:
            self._stats["retries"] += 1

    def _unreachable(self, exc: BaseException) -> None:
        """A request failed with a transient error: report the outage when it starts, then every minute."""
        now = time.time()
        with self._cond:
            started = self._unreachable_since is None
            if started:
                self._unreachable_since = self._stats["unreachable_since"] = now
            due = started or now - self._unreachable_reported >= 60
            if due:
                self._unreachable_reported = now
            since = self._unreachable_since
        if started:
            self._unreachable_gauge.set(since)
        if due:
            deadline = self.retry.give_up_after
            until = f"until {_clock(since + deadline)}" if deadline is not None else "without a deadline"
            log.warning("checkpoint store %s unreachable since %s (%.0fs): %s; retrying with backoff %s",
                        self.uri, _clock(since), now - since, describe(exc), until)

    def _reachable(self) -> None:
        if self._unreachable_since is None:
            return
        with self._cond:
            since, self._unreachable_since = self._unreachable_since, None
            self._stats["unreachable_since"] = None
        if since is not None:
            self._unreachable_gauge.set(0)
            log.warning("checkpoint store %s reachable again after %.0fs (unreachable since %s)",
                        self.uri, time.time() - since, _clock(since))

    def _upload(self, job: _Job) -> CheckpointInfo:
        name = step_dir_name(job.step)
        if self._abort.is_set():
            raise UploadAbandoned(f"{name}: not started, the store was closed before its turn")
        folder = self.location.path(name)
        loc = self.location
        # A folder of this step from an earlier life of the run stops being a checkpoint before any of
        # its files are replaced; one of an earlier generation (before a fresh start) is moved aside.
        if self.generation > 0:
            old = self._read_manifest_or_none(name)
            if old is not None and generation_of(old) < self.generation:
                aside = loc.path(SUPERSEDED, f"{name}.g{generation_of(old)}")
                self._call(lambda: loc.move_tree(folder, aside), f"moving {name} of an earlier start aside")
                log.info("%s/%s of an earlier start moved to %s/%s until this start's first checkpoint exists",
                         self.uri, name, SUPERSEDED, aside.rsplit("/", 1)[-1])
        self._call(lambda: loc.remove_file(loc.path(name, MANIFEST)), f"removing old manifest of {name}")
        self._manifests.pop(name, None)
        job.cleared = True

        def upload_one(rel: str, local: Path, size: int) -> FileEntry:
            digest = in_background(sha256_file, local)  # hashed while it uploads
            self._call(lambda: loc.put_file(local, loc.path(name, rel)), f"uploading {name}/{rel}")
            self._upload_bytes.inc(size)
            with self._cond:
                self._stats["uploaded_bytes"] += size
            return FileEntry(rel, size, digest.result())

        files = [f for f in local_files(job.staging) if f[0] != MANIFEST]
        entries = run_parallel([lambda f=f: upload_one(*f) for f in files], self.max_concurrency)

        remote = self._call(lambda: loc.list_files(folder), f"listing {name}")
        for entry in entries:
            got = remote.get(entry.path, {}).get("size")
            if got != entry.size:
                raise CheckpointUploadError(f"{name}/{entry.path}: {got} bytes in the store, {entry.size} staged")

        created = time.time()
        manifest = new_manifest(job.step, job.epoch, created, job.size, job.metadata, self.generation,
                                self.fresh_token, entries)
        self._call(lambda: loc.write_bytes(loc.path(name, MANIFEST), encode(manifest)), f"writing {name}/{MANIFEST}")
        self._manifests[name] = manifest
        if job.step >= self._newest_uploaded:
            self._newest_uploaded = job.step
            try:  # the checkpoint exists from here on; the pointer is only informational
                self._call(lambda: loc.write_bytes(loc.path(LATEST), name.encode()), f"updating {LATEST}")
            except Exception as exc:
                log.warning("%s/%s not updated to %s: %s", self.uri, LATEST, name, describe(exc))
        elapsed = time.monotonic() - job.committed_at
        self._save_duration.observe(elapsed)
        self._last_success.set(created)
        with self._cond:
            self._stats["saved"] += 1
            self._stats["last_save_seconds"] = elapsed
            self._stats["last_saved_step"] = job.step
        log.info("checkpoint step %d saved to %s/%s (%.1f MB, %.1fs after commit)",
                 job.step, self.uri, name, job.size / 1e6, elapsed)
        info = CheckpointInfo(job.step, job.epoch, name, f"{self.uri}/{name}", created, tuple(entries),
                              dict(job.metadata))
        if self.on_saved is not None:
            try:
                self.on_saved(info)
            except Exception as exc:  # a listener's bug never fails a saved checkpoint
                log.warning("on_saved for checkpoint step %d failed: %s", job.step, describe(exc))
        try:
            self.apply_retention()
        except Exception as exc:  # the checkpoint is safe; old ones go next time
            log.warning("retention at %s failed: %s", self.uri, describe(exc))
        return info

    # --- retention ------------------------------------------------------------------------------

    def apply_retention(self) -> list[int]:
        """Delete the checkpoints the policy no longer keeps; returns their steps. Keeps the last
        `keep_last` checkpoints and the first at or after every multiple of `keep_every_epochs`;
        never touches the newest checkpoint this store uploaded, anything newer than it (another
        writer's upload in progress), anything outside this run's folder, or a folder without a
        manifest younger than `orphan_grace_seconds`. Checkpoints of an earlier generation (a start that
        a fresh start superseded) all go once this store's first checkpoint exists. Idempotent."""
        newest = self._newest_uploaded
        if newest < 0:
            return []
        folders = self._call(self._scan, f"listing {self.uri}")
        complete: dict[int, float] = {}  # step -> epoch, for folders with a readable manifest of this generation
        orphans: list[int] = []
        superseded: list[int] = []
        for step, files in sorted(folders.items()):
            name = step_dir_name(step)
            manifest = (self._manifests.get(name) or self._read_manifest_or_none(name)) if MANIFEST in files else None
            if manifest is not None and generation_of(manifest) < self.generation:
                superseded.append(step)
            elif step > newest or (manifest is not None and generation_of(manifest) > self.generation):
                continue
            elif manifest is not None:
                complete[step] = float(manifest["epoch"])
            elif step < newest:
                orphans.append(step)
        if newest not in complete:  # our newest was replaced and that upload failed: decide nothing now
            return []

        keep = set(sorted(complete)[-self.keep_last:]) | {newest}
        if self.keep_every_epochs:
            seen = set()
            for step in sorted(complete):
                multiple = math.floor(complete[step] / self.keep_every_epochs + 1e-9)
                if multiple >= 1 and multiple not in seen:
                    seen.add(multiple)
                    keep.add(step)
        doomed = [step for step in complete if step not in keep] + superseded
        now = time.time()
        doomed += [step for step in orphans
                   if all(now - _mtime(info) > self.orphan_grace_seconds for info in folders[step].values())]
        loc = self.location
        for step in sorted(doomed):
            name = step_dir_name(step)
            self._call(lambda: loc.remove_file(loc.path(name, MANIFEST)), f"deleting {name}/{MANIFEST}")
            self._manifests.pop(name, None)
            self._call(lambda: loc.remove_tree(loc.path(name)), f"deleting {name}")
        if self.generation > 0 and loc.list_files(loc.path(SUPERSEDED)):
            self._call(lambda: loc.remove_tree(loc.path(SUPERSEDED)), f"deleting {SUPERSEDED}/")
            log.info("retention at %s deleted %s/ (checkpoints of an earlier start)", self.uri, SUPERSEDED)
        if doomed:
            log.info("retention at %s deleted %s", self.uri, ", ".join(step_dir_name(s) for s in sorted(doomed)))
        return sorted(doomed)

    def _scan(self) -> dict[int, dict[str, dict]]:
        """{step: {path in the step folder: info}} from one recursive listing. Only folders holding
        files count: some S3 servers (SeaweedFS) keep listing emptied prefixes for minutes."""
        folders: dict[int, dict[str, dict]] = {}
        for rel, info in self.location.list_files(self.location.root, name_prefix="step-").items():
            top, _, rest = rel.partition("/")
            if rest and (m := STEP_DIR.match(top)):
                folders.setdefault(int(m.group(1)), {})[rest] = info
        return folders

    def _read_manifest_or_none(self, name: str) -> Optional[dict]:
        loc = self.location
        try:
            raw = self._call(lambda: loc.read_bytes(loc.path(name, MANIFEST)), f"reading {name}/{MANIFEST}")
            manifest = parse_manifest(raw, int(STEP_DIR.match(name).group(1)))
        except (FileNotFoundError, CheckpointInvalid):
            return None
        self._manifests[name] = manifest
        return manifest

    # --- resuming -------------------------------------------------------------------------------

    def list_steps(self) -> list[int]:
        """Steps with a (non-empty) folder at the URI, verified or not, oldest first."""
        return sorted(self._read(self._scan, f"listing {self.uri}"))

    def read_latest_pointer(self) -> Optional[str]:
        """The folder name in `latest` (informational; resume never trusts it alone)."""
        try:
            return self._read(lambda: self.location.read_bytes(self.location.path(LATEST)), "reading latest")\
                .decode().strip() or None
        except FileNotFoundError:
            return None

    def verify(self, step: int, *, full: bool = True) -> CheckpointInfo:
        """The checkpoint at `step` if its manifest is there and every file matches it in size (and in
        sha256 with `full`, which reads every byte); CheckpointInvalid otherwise."""
        name = step_dir_name(step)
        listing = self._read(lambda: self.location.list_files(self.location.path(name)), f"listing {name}")
        return self._verify(step, listing, full)

    def _load_manifest(self, step: int) -> dict:
        name = step_dir_name(step)
        loc = self.location
        try:
            raw = self._read(lambda: loc.read_bytes(loc.path(name, MANIFEST)), f"reading {name}/{MANIFEST}")
        except FileNotFoundError:
            raise CheckpointInvalid(f"{name}: no {MANIFEST} (upload never finished)") from None
        try:
            manifest = parse_manifest(raw, step)
        except CheckpointInvalid as exc:
            raise CheckpointInvalid(f"{name}: {exc}") from None
        self._manifests[name] = manifest
        return manifest

    def _verify(self, step: int, listing: dict[str, dict], full: bool,
                manifest: Optional[dict] = None) -> CheckpointInfo:
        name = step_dir_name(step)
        loc = self.location
        if MANIFEST not in listing:
            raise CheckpointInvalid(f"{name}: no {MANIFEST} (upload never finished)")
        info = info_from_manifest(manifest or self._load_manifest(step), name, self.uri)
        for entry in info.files:
            if entry.path not in listing:
                raise CheckpointInvalid(f"{name}: {entry.path} is missing")
            if listing[entry.path].get("size") != entry.size:
                raise CheckpointInvalid(f"{name}: {entry.path} has {listing[entry.path].get('size')} bytes, "
                                        f"manifest says {entry.size} (truncated?)")
        if full:
            for entry in info.files:
                digest = self._read(lambda: sha256_remote(loc, loc.path(name, entry.path)), f"reading {name}")
                if digest != entry.sha256:
                    raise CheckpointInvalid(f"{name}: {entry.path} sha256 does not match the manifest")
        return info

    def _plan(self, folders: dict[int, dict[str, dict]], fresh: Optional[str]) -> "_ResumePlan":
        """Which checkpoints a start may resume from. Folders without a manifest are uploads that never
        finished (not checkpoints); the others belong to the newest generation or are superseded."""
        manifests: dict[int, dict] = {}
        problems: list[str] = []  # unreadable manifests: their generation is unknown, so they count as ours
        for step in sorted(folders, reverse=True):
            if MANIFEST not in folders[step]:
                log.warning("skipping checkpoint at %s: %s: no %s (upload never finished)", self.uri,
                            step_dir_name(step), MANIFEST)
                continue
            try:
                manifests[step] = self._load_manifest(step)
            except CheckpointInvalid as exc:
                log.warning("skipping checkpoint at %s: %s", self.uri, exc)
                problems.append(str(exc))
        current = max(map(generation_of, manifests.values()), default=0)
        ours = [step for step, m in manifests.items() if generation_of(m) == current]
        token = next((manifests[step][FRESH] for step in ours if manifests[step].get(FRESH)), None)
        if fresh and token != fresh:  # a new fresh start (not a restart of the one that wrote these)
            return _ResumePlan(current + 1 if manifests or problems else current, fresh, True, [], manifests,
                               problems, sorted(manifests, reverse=True))
        superseded = [step for step, m in manifests.items() if generation_of(m) < current]
        return _ResumePlan(current, token, False, ours, manifests, problems, superseded)

    def latest_verified(self, *, full: bool = True) -> Optional[CheckpointInfo]:
        """The newest checkpoint of the newest generation that verifies (see verify), skipping bad ones
        with a warning; None when there is none. NoVerifiedCheckpoint when there are some and none
        verifies; StoreUnavailable if the store cannot be read (never a silent None)."""
        folders = self._read(self._scan, f"listing {self.uri}")
        plan = self._plan(folders, None)
        return self._newest_that_verifies(plan, lambda step: self._verify(step, folders[step], full,
                                                                          plan.manifests[step]))

    def download(self, info: CheckpointInfo, dest_dir: str | Path) -> Path:
        """Copy checkpoint `info` to `dest_dir/<step folder>` and check every file's sha256 on the local
        copy; returns that folder. CheckpointInvalid if a file does not match (the copy is removed)."""
        dest = Path(dest_dir) / info.name
        partial = Path(dest_dir) / f".{info.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        loc = self.location

        def fetch(entry: FileEntry) -> None:
            local = partial / entry.path
            self._read(lambda: loc.get_file(loc.path(info.name, entry.path), local), f"downloading {entry.path}")
            if local.stat().st_size != entry.size or sha256_file(local) != entry.sha256:
                raise CheckpointInvalid(f"{info.name}: {entry.path} does not match the manifest")

        try:
            partial.mkdir(parents=True)
            run_parallel([lambda e=e: fetch(e) for e in info.files], self.max_concurrency)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
        return dest

    def restore_latest(self, dest_dir: str | Path, *, fresh: Optional[str] = None
                       ) -> Optional[tuple[CheckpointInfo, Path]]:
        """Download the newest checkpoint that verifies into `dest_dir` and return it with its local
        folder; None if there is none. Reads each byte once: sizes are checked in the store, sha256 on
        the local copy, and a bad checkpoint falls back to the one before. When checkpoints exist and
        none verifies: NoVerifiedCheckpoint, naming each and what is wrong with it.

        Only the newest generation counts. With `fresh` (a token: the fresh start's DLMCTL_FRESH) the
        store starts a new generation and returns None, unless the newest generation was written with
        that same token (this is a restart of that fresh start: it resumes). This store then writes
        its checkpoints in the chosen generation, and retention removes older generations once the
        first of them exists."""
        folders = self._read(self._scan, f"listing {self.uri}")
        plan = self._plan(folders, fresh)
        self.generation, self.fresh_token = plan.generation, plan.fresh_token
        if plan.fresh:
            if plan.manifests or plan.problems:
                log.warning("fresh start at %s: not resuming from the %d checkpoint(s) there (%s); they stay until "
                            "this start's first checkpoint is written", self.uri,
                            len(plan.manifests) + len(plan.problems),
                            ", ".join(step_dir_name(s) for s in plan.superseded) or "unreadable manifests")
            return None
        if plan.superseded:
            log.info("%s: not resuming %d checkpoint(s) of an earlier start, superseded by a fresh start: %s",
                     self.uri, len(plan.superseded), ", ".join(step_dir_name(s) for s in plan.superseded))
        def verified_copy(step: int):
            info = self._verify(step, folders[step], full=False, manifest=plan.manifests[step])
            return info, self.download(info, dest_dir)

        return self._newest_that_verifies(plan, verified_copy)

    def _newest_that_verifies(self, plan: "_ResumePlan", attempt: Callable[[int], T]) -> Optional[T]:
        """`attempt(step)` for the plan's candidates, newest first, until one does not raise CheckpointInvalid
        (each that does is skipped with a warning). None when there were none; NoVerifiedCheckpoint when there
        were some and none verified."""
        problems = list(plan.problems)
        for step in plan.candidates:
            try:
                return attempt(step)
            except CheckpointInvalid as exc:
                log.warning("skipping checkpoint at %s: %s", self.uri, exc)
                problems.append(str(exc))
        if problems:
            raise NoVerifiedCheckpoint(self.uri, problems)
        return None

    def _read(self, fn: Callable[[], T], what: str) -> T:
        try:
            return retry_call(fn, what=what, policy=self.retry, on_retry=self._count_retry,
                              on_failure=self._unreachable, on_success=self._reachable)
        except CheckpointUploadError as exc:
            raise StoreUnavailable(f"{self.uri}: {exc}") from exc


@dataclass
class _ResumePlan:
    generation: int  # of the checkpoints written from now on
    fresh_token: Optional[str]
    fresh: bool  # start over at step 0 (a new generation)
    candidates: list[int]  # steps of the newest generation with a manifest, newest first
    manifests: dict[int, dict]  # step -> parsed manifest, every folder with a readable one
    problems: list[str]  # unreadable manifests
    superseded: list[int]  # steps not resumed: an earlier generation (or all of them, for a fresh start)


def _mtime(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("created")
    if value is None:
        return 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)
