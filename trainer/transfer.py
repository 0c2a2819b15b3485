"""Moving files to and from a store location: sha256 of local and stored files, several transfers at once,
and the final export (`<uri>/export/` with its own manifest)."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, TypeVar

from .manifest import EXPORT, FORMAT, FORMAT_VERSION, MANIFEST
from .retries import RetryPolicy, retry_call
from .storage import Location, open_location
from .store_errors import CheckpointInvalid

log = logging.getLogger("dlmctl.checkpoints")
T = TypeVar("T")
_HASH_CHUNK = 8 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_remote(location: Location, path: str) -> str:
    digest = hashlib.sha256()
    with location.open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(folder: Path) -> list[tuple[str, Path, int]]:
    """(relative posix path, absolute path, size) of every file below `folder`, sorted."""
    out = []
    for dirpath, _, filenames in os.walk(folder, followlinks=True):
        for name in filenames:
            full = Path(dirpath) / name
            out.append((full.relative_to(folder).as_posix(), full, full.stat().st_size))
    return sorted(out)


def run_parallel(tasks: list[Callable[[], T]], workers: int) -> list[T]:
    """Run `tasks` on up to `workers` daemon threads (an upload never holds up interpreter exit: what it
    leaves has no manifest); results in order. After a failure no new task starts; the error is raised.
    Not a ThreadPoolExecutor: its workers are joined at interpreter exit, so an upload still retrying (up to
    the store's deadline) would keep a crashed trainer alive."""
    results: list = [None] * len(tasks)
    errors: list[BaseException] = []
    pending = iter(enumerate(tasks))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if errors:
                    return
                index, task = next(pending, (None, None))
            if task is None:
                return
            try:
                results[index] = task()
            except BaseException as exc:
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(tasks)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def in_background(fn: Callable[..., T], *args) -> "concurrent.futures.Future[T]":
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def write_export(uri: str, files: Mapping[str, str | Path], *, endpoint_url: Optional[str] = None,
                 retry: RetryPolicy = RetryPolicy(give_up_after=600.0)) -> str:
    """Upload `files` ({name in the export: local path}, e.g. model.safetensors, config.json) to
    `<uri>/export/`, then an export manifest with sizes and sha256. Returns the export URI."""
    for name in files:
        if not name or "/" in name or name in (".", "..", MANIFEST):
            raise ValueError(f"{name!r}: export file names are plain names other than {MANIFEST}")
    loc = open_location(uri, endpoint_url=endpoint_url).child(EXPORT)

    def call(fn, what):
        return retry_call(fn, what=what, policy=retry)

    call(lambda: loc.remove_file(loc.path(MANIFEST)), "removing the old export manifest")
    entries = []
    for name, local in sorted(files.items()):
        size = Path(local).stat().st_size
        call(lambda: loc.put_file(local, loc.path(name)), f"uploading export/{name}")
        entries.append({"path": name, "size": size, "sha256": sha256_file(local)})
    manifest = {"format": FORMAT + "-export", "version": FORMAT_VERSION, "created": time.time(), "files": entries}
    call(lambda: loc.write_bytes(loc.path(MANIFEST), json.dumps(manifest, indent=1).encode()),
         "writing the export manifest")
    log.info("exported %s to %s", ", ".join(sorted(files)), loc.uri)
    return loc.uri


def read_export(uri: str, dest_dir: str | Path, *, endpoint_url: Optional[str] = None,
                retry: RetryPolicy = RetryPolicy(give_up_after=600.0)) -> Path:
    """Download `<uri>/export/` into `dest_dir` and check it against its manifest; returns dest_dir."""
    loc = open_location(uri, endpoint_url=endpoint_url).child(EXPORT)
    try:
        manifest = json.loads(retry_call(lambda: loc.read_bytes(loc.path(MANIFEST)), what="reading export",
                                         policy=retry))
    except FileNotFoundError:
        raise CheckpointInvalid(f"{loc.uri}: no export there") from None
    dest = Path(dest_dir)
    for entry in manifest["files"]:
        local = dest / entry["path"]
        retry_call(lambda: loc.get_file(loc.path(entry["path"]), local), what=f"downloading export/{entry['path']}",
                   policy=retry)
        if local.stat().st_size != entry["size"] or sha256_file(local) != entry["sha256"]:
            raise CheckpointInvalid(f"{loc.uri}/{entry['path']} does not match the export manifest")
    return dest
