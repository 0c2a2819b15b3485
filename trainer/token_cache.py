"""The token cache: one entry per (sources, validation, tokenizer), shared by every sweep point.

An entry `<cache>/<key>/` (a local directory, or an s3:// prefix mirrored into a local directory):

    plan/documents.npy   the pool's candidate documents in hash order (`data_plan.DOCUMENT`)
    plan/shards.npy      shard j holds documents [shards[j], shards[j + 1])
    plan/tokenizer.json  plan/val.npy
    plan.json            the plan's manifest: key, source files, statistics, sha256 of the files above
    shards/tokens-<j>.npy     shard j's token stream (each document followed by eos)
    shards/documents-<j>.npy  end of each of its documents in that stream (int64)
    shards/counts-<j>.npy     its unigram counts (int64, one per token id)
    shards/shard-<j>.json     shard j's manifest: documents, token count, sha256 of its three files
    manifest.json        written once every shard has its manifest (the same bytes from any writer)

Manifests are written last (locally: every file through a temporary name and a rename; on S3: the data
objects, then the manifest object), and readers trust only what a manifest covers; what is fetched from
S3 is checked against its sha256 (streamed to disk, never held in memory). A machine training from the
cache assembles the shards it needs, in order, into one local file `stream.bin` (`stream.json` records
how many shards it holds) that the training processes memory-map.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional, TypeVar

import numpy as np

from dlmctl.spec.files import write_atomically

from .data_plan import COPY_CHUNK, Plan, file_sha256
from .retries import RetryPolicy, retry_call
from .storage import Location, open_location
from .tokenizer import Tokenizer

REMOTE_RETRIES = RetryPolicy(first_delay=1.0, max_delay=30.0, give_up_after=600.0)
T = TypeVar("T")
PLAN_FILES = ("plan/documents.npy", "plan/shards.npy", "plan/tokenizer.json", "plan/val.npy")


def shard_files(j: int) -> dict[str, str]:
    return {name: f"shards/{name}-{j:05d}.npy" for name in ("tokens", "documents", "counts")}


def shard_manifest_name(j: int) -> str:
    return f"shards/shard-{j:05d}.json"


def json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


class TokenCache:
    """Entries in a local directory, optionally mirrored from/to an s3:// prefix."""

    def __init__(self, location: str | Path, local_root: Path):
        uri = str(location)
        self.remote: Optional[Location] = open_location(uri) if uri.startswith("s3://") else None
        self.local_root = Path(local_root if self.remote else uri.removeprefix("file://")).expanduser()

    def entry(self, key: str) -> "Entry":
        return Entry(self, key)


class Entry:
    def __init__(self, cache: TokenCache, key: str):
        self.key, self.root = key, cache.local_root / key
        self.lock_path = cache.local_root / f".{key}.lock"
        self.remote = cache.remote.child(key) if cache.remote else None

    # --- local files, written atomically ---------------------------------------------------

    def path(self, relative: str) -> Path:
        return self.root / relative

    def scratch(self) -> Path:
        """A private temporary directory inside the entry (same filesystem: renames are atomic)."""
        folder = self.root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder

    def _install(self, source: Path, relative: str) -> None:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)

    def _write_local(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, data)

    def _read_json(self, relative: str) -> Optional[dict]:
        path = self.path(relative)
        return json.loads(path.read_text()) if path.exists() else None

    @contextlib.contextmanager
    def lock(self):
        """Processes on one machine take turns: the first builds, the others then find what it built."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- the remote mirror -------------------------------------------------------------------

    def _remotely(self, what: str, request: Callable[[], T]) -> T:
        """One request to the S3 mirror, retried as the checkpoint store retries its own (transient errors
        with backoff until REMOTE_RETRIES gives up; a permanent one, e.g. a missing bucket, at once)."""
        return retry_call(request, what=f"token cache {self.key}: {what}", policy=REMOTE_RETRIES)

    def _remote_exists(self, relative: str) -> bool:
        path = self.remote.path(relative)
        return self._remotely(f"look for {relative}", lambda: self.remote.fs.exists(path))

    def _remote_write(self, relative: str, data: bytes) -> None:
        self._remotely(f"write {relative}", lambda: self.remote.write_bytes(self.remote.path(relative), data))

    def _remote_json(self, relative: str) -> Optional[bytes]:
        if self.remote is None or not self._remote_exists(relative):
            return None
        return self._remotely(f"read {relative}", lambda: self.remote.read_bytes(self.remote.path(relative)))

    def _upload(self, files: list[str], manifest: str) -> None:
        """Data objects first, the manifest last: a reader never trusts a half-uploaded set."""
        for relative in files:
            self._remotely(f"upload {relative}",
                           lambda relative=relative: self.remote.put_file(self.path(relative), self.remote.path(relative)))
        self._remote_write(manifest, self.path(manifest).read_bytes())

    def _download(self, manifest_bytes: bytes, manifest: str, expected: dict[str, str]) -> bool:
        """Fetch the files `expected` names (relative path → sha256) and then the manifest; False (and
        nothing installed) when one does not match."""
        scratch = self.scratch()
        try:
            for i, (relative, sha256) in enumerate(expected.items()):
                local = scratch / str(i)
                self._remotely(f"download {relative}",
                               lambda relative=relative, local=local: self.remote.get_file(self.remote.path(relative), local))
                if file_sha256(local) != sha256:
                    return False
            for i, relative in enumerate(expected):
                self._install(scratch / str(i), relative)
            self._write_local(manifest, manifest_bytes)
            return True
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # --- the plan ----------------------------------------------------------------------------

    def plan_manifest(self) -> Optional[dict]:
        """The plan's manifest once the plan is here (fetched from S3 when only there), else None."""
        local = self._read_json("plan.json")
        if local is not None:
            if self.remote is not None and not self._remote_exists("plan.json"):
                self.share()  # built here before the S3 cache was configured
            return local
        remote = self._remote_json("plan.json")
        if remote is None:
            return None
        manifest = json.loads(remote)
        return manifest if self._download(remote, "plan.json", manifest["sha256"]) else None

    def load_plan(self) -> Optional[Plan]:
        manifest = self.plan_manifest()
        if manifest is None:
            return None
        return Plan(
            files=manifest["files"],
            documents=np.load(self.path("plan/documents.npy"), mmap_mode="r"),
            shard_starts=np.load(self.path("plan/shards.npy")),
            tokenizer=Tokenizer.from_json(self.path("plan/tokenizer.json").read_text()),
            val=np.load(self.path("plan/val.npy")),
            stats=manifest["stats"],
        )

    def store_plan(self, plan: Plan, key_parts: dict) -> None:
        scratch = self.scratch()
        try:
            np.save(scratch / "documents.npy", plan.documents)
            np.save(scratch / "shards.npy", plan.shard_starts)
            (scratch / "tokenizer.json").write_text(plan.tokenizer.to_json())
            np.save(scratch / "val.npy", plan.val)
            hashes = {relative: file_sha256(scratch / Path(relative).name) for relative in PLAN_FILES}
            for relative in PLAN_FILES:
                self._install(scratch / Path(relative).name, relative)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        manifest = {"key": key_parts, "files": plan.files, "stats": plan.stats, "shards": plan.num_shards, "sha256": hashes}
        self._write_local("plan.json", json_bytes(manifest))  # no timings: every writer writes the same bytes
        if self.remote is not None:
            self._upload(list(PLAN_FILES), "plan.json")

    def share(self) -> None:
        """Upload what this machine holds of the entry (plan, shards, completion) to the S3 mirror."""
        self._upload(list(PLAN_FILES), "plan.json")
        for manifest in sorted(self.root.glob("shards/shard-*.json")):
            j = int(manifest.stem.split("-")[1])
            files = list(shard_files(j).values())
            if all(self.path(f).exists() for f in files):
                self._upload(files, shard_manifest_name(j))
        if self.path("manifest.json").exists():
            self._remote_write("manifest.json", self.path("manifest.json").read_bytes())

    # --- shards ------------------------------------------------------------------------------

    def shard_manifest(self, j: int) -> Optional[dict]:
        """Shard j's manifest where it is complete here or on S3 (not fetched), else None."""
        local = self._read_json(shard_manifest_name(j))
        if local is not None:
            return local
        remote = self._remote_json(shard_manifest_name(j))
        return json.loads(remote) if remote is not None else None

    def fetch_shard(self, j: int) -> Optional[dict]:
        """Shard j's manifest once its files are here (downloaded and checked when only on S3), else None."""
        local = self._read_json(shard_manifest_name(j))
        if local is not None and all(self.path(f).exists() for f in shard_files(j).values()):
            return local
        remote = self._remote_json(shard_manifest_name(j))
        if remote is None:
            return None
        manifest = json.loads(remote)
        expected = {shard_files(j)[name]: sha for name, sha in manifest["sha256"].items()}
        return manifest if self._download(remote, shard_manifest_name(j), expected) else None

    def store_shard(self, j: int, folder: Path, manifest: dict, keep_local: bool = True) -> None:
        """Install shard j's files built in `folder` (see `data_plan.build_shard`), then its manifest."""
        for name, relative in shard_files(j).items():
            self._install(folder / f"{name}.npy", relative)
        self._write_local(shard_manifest_name(j), json_bytes(manifest))
        if self.remote is not None:
            self._upload(list(shard_files(j).values()), shard_manifest_name(j))
            if not keep_local:
                for relative in shard_files(j).values():
                    self.path(relative).unlink()

    def forget_shard(self, j: int) -> None:
        """Drop this machine's copy of shard j (it did not verify)."""
        for relative in [shard_manifest_name(j), *shard_files(j).values()]:
            self.path(relative).unlink(missing_ok=True)

    # --- completion --------------------------------------------------------------------------

    def completion(self) -> Optional[dict]:
        local = self._read_json("manifest.json")
        if local is not None:
            return local
        remote = self._remote_json("manifest.json")
        return json.loads(remote) if remote is not None else None

    def write_completion(self, manifests: list[dict], key_parts: dict) -> dict:
        """The entry's completion manifest, from every shard's manifest: the same bytes from any writer."""
        completion = {"key": key_parts, "shards": len(manifests), "tokens": [m["tokens"] for m in manifests],
                      "total_tokens": sum(m["tokens"] for m in manifests),
                      "sha256": [m["sha256"]["tokens"] for m in manifests]}
        data = json_bytes(completion)
        self._write_local("manifest.json", data)
        if self.remote is not None:
            self._remote_write("manifest.json", data)
        return completion

    # --- the local stream --------------------------------------------------------------------

    def stream_state(self) -> dict:
        return self._read_json("stream.json") or {"ends": []}

    def append_to_stream(self, j: int, manifest: dict, dtype: np.dtype) -> bool:
        """Append shard j's tokens to stream.bin (which must hold shards 0..j-1), checking its sha256
        as it is copied; False (nothing recorded) when it does not match."""
        state = self.stream_state()
        assert len(state["ends"]) == j, f"the stream holds {len(state['ends'])} shards, not {j}"
        held = (state["ends"][-1] if j else 0) * dtype.itemsize
        digest = hashlib.sha256()
        stream = self.path("stream.bin")
        with open(self.path(shard_files(j)["tokens"]), "rb") as shard, open(stream, "r+b" if stream.exists() else "wb") as out:
            out.truncate(held)  # a copy cut short by a crash is dropped
            out.seek(held)
            if np.lib.format.read_magic(shard) != (1, 0):
                return False
            shape, _, stored = np.lib.format.read_array_header_1_0(shard)
            header_end = shard.tell()
            shard.seek(0)
            digest.update(shard.read(header_end))
            if stored != dtype or shape != (manifest["tokens"],):
                return False
            while block := shard.read(COPY_CHUNK * dtype.itemsize):
                digest.update(block)
                out.write(block)
            if digest.hexdigest() != manifest["sha256"]["tokens"]:
                out.truncate(held)
                return False
            out.flush()
            os.fsync(out.fileno())
        self._write_local("stream.json", json_bytes({"ends": state["ends"] + [(state["ends"][-1] if j else 0) + manifest["tokens"]]}))
        return True

    def stream(self, length: int, dtype: np.dtype) -> np.ndarray:
        """The first `length` tokens of the stream, memory-mapped."""
        if length == 0:
            return np.zeros(0, dtype)
        return np.memmap(self.path("stream.bin"), dtype=dtype, mode="r", shape=(length,))
