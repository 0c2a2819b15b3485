"""Where checkpoints and exports live: a URI (`s3://bucket/prefix`, `file:///path` or a plain local path)
opened as an fsspec filesystem plus a root path inside it.

S3 credentials come from the environment the way AWS tools read them (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or AWS_PROFILE); the endpoint of an S3-compatible store from
the `endpoint_url` argument or AWS_ENDPOINT_URL. Credentials are handed to s3fs and nowhere else: a
`Location` prints as its URI only, and no log line of this package carries them.
"""
from __future__ import annotations

import os
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import fsspec

# botocore's own retries stay short: the checkpoint uploader retries with its own backoff and budget.
S3_CLIENT_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"total_max_attempts": 2, "mode": "standard"}}


@dataclass
class Location:
    """A root inside a filesystem. Paths handed out are always `root/...`: nothing outside the root."""

    uri: str
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    root: str  # path inside `fs`, no trailing slash

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        """`root/part/...`; a part may not climb out of the root."""
        for part in parts:
            if not part or part.startswith("/") or ".." in part.split("/"):
                raise ValueError(f"{part!r}: not a relative path inside {self.uri}")
        return posixpath.join(self.root, *parts)

    def child(self, *parts: str) -> "Location":
        return Location(uri=self.uri.rstrip("/") + "/" + "/".join(parts), fs=self.fs, root=self.path(*parts))

    def contains(self, path: str) -> bool:
        return path.rstrip("/").startswith(self.root + "/") and ".." not in path.split("/")

    # --- the few operations the checkpoint store needs, local and S3 alike ---

    def list_files(self, path: str, name_prefix: str = "") -> dict[str, dict]:
        """Every file below `path` whose relative path starts with `name_prefix` (filtered by the server
        on S3), recursively, as {relative posix path: info (size, mtime...)}."""
        try:
            if name_prefix and not self.is_local:
                found = self.fs.find(path, detail=True, prefix=name_prefix)
            else:
                found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        prefix = path.rstrip("/") + "/"
        return {name[len(prefix):]: info for name, info in found.items()
                if name.startswith(prefix + name_prefix) and info.get("type", "file") != "directory"}

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Whole-object write: atomic on S3 (a PUT), via a temporary file and a rename locally."""
        if self.is_local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            self.fs.pipe_file(tmp, data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def put_file(self, local: str | Path, path: str) -> None:
        self.fs.put_file(str(local), path)

    def get_file(self, path: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(path, str(local))

    def open(self, path: str, mode: str = "rb"):
        return self.fs.open(path, mode)

    def remove_tree(self, path: str) -> None:
        """Delete `path` and everything below; a path that is already gone is fine."""
        if not self.contains(path):
            raise ValueError(f"refusing to delete {path!r}: outside {self.uri}")
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def move_tree(self, src: str, dst: str) -> None:
        """Move `src` and everything below it to `dst` (replaced if it exists): a rename locally; on S3 a
        server-side copy of every object, then the deletion of the originals."""
        for path in (src, dst):
            if not self.contains(path):
                raise ValueError(f"refusing to move {path!r}: outside {self.uri}")
        self.remove_tree(dst)
        if self.is_local:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
        else:
            self.fs.copy(src.rstrip("/") + "/", dst.rstrip("/") + "/", recursive=True)
            self.remove_tree(src)

    def remove_file(self, path: str) -> None:
        if not self.contains(path):
            raise ValueError(f"refusing to delete {path!r}: outside {self.uri}")
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def __str__(self) -> str:
        return self.uri


def open_location(uri: str | os.PathLike, *, endpoint_url: Optional[str] = None) -> Location:
    """The filesystem and root for `uri`. Raises ValueError for a scheme other than s3:// or file://."""
    uri = os.fspath(uri).strip()
    if not uri:
        raise ValueError("empty storage URI")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        root = str(Path(uri).expanduser().resolve())
        return Location(uri=root, fs=fsspec.filesystem("file", auto_mkdir=True), root=root)
    scheme = scheme.lower()
    if scheme == "file":
        root = str(Path(rest).expanduser().resolve())
        return Location(uri="file://" + root, fs=fsspec.filesystem("file", auto_mkdir=True), root=root)
    if scheme == "s3":
        if "@" in rest.split("/", 1)[0]:
            raise ValueError("credentials do not belong in the URI: use the environment or a Secret")
        root = rest.strip("/")
        if not root or not re.match(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", root):
            raise ValueError(f"{uri!r}: expected s3://bucket[/prefix]")
        if "//" in root or ".." in root.split("/"):
            raise ValueError(f"{uri!r}: empty or '..' path segments are not allowed")
        return Location(uri="s3://" + root, fs=s3_filesystem(endpoint_url=endpoint_url), root=root)
    raise ValueError(f"{uri!r}: only s3:// URIs and local paths are supported")


def s3_filesystem(*, endpoint_url: Optional[str] = None, env: Optional[dict] = None):
    """An s3fs filesystem configured from the environment (or `env`). Never cached between callers,
    so a key rotated in the environment is picked up by the next store."""
    import s3fs

    env = os.environ if env is None else env
    options: dict = {
        "skip_instance_cache": True,
        "use_listings_cache": False,  # other writers (a previous incarnation of the run) change the prefix
        "config_kwargs": dict(S3_CLIENT_CONFIG),
    }
    endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options["key"] = env["AWS_ACCESS_KEY_ID"]
        options["secret"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            options["token"] = env["AWS_SESSION_TOKEN"]
    elif env.get("AWS_PROFILE"):
        options["profile"] = env["AWS_PROFILE"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return s3fs.S3FileSystem(**options)


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)
