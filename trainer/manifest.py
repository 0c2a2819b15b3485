"""A checkpoint's manifest: the names of the store's layout, and the manifest that makes a step folder a
checkpoint (every file with its size and sha256, the step, epoch and generation), built and parsed."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .store_errors import CheckpointInvalid, describe

FORMAT = "dlmctl-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXPORT = "export"
GENERATION, FRESH = "generation", "fresh"  # manifest fields: which start of the run wrote it (see restore_latest)
STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"step {step} < 0")
    return f"step-{step:08d}"


@dataclass(frozen=True)
class FileEntry:
    path: str  # posix, relative to the step folder
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    epoch: float
    name: str  # step-00001200
    uri: str  # the step folder's URI
    created: float  # unix time the manifest was written
    files: tuple[FileEntry, ...]
    metadata: dict = field(default_factory=dict, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def new_manifest(step: int, epoch: float, created: float, total_bytes: int, metadata: dict, generation: int,
                 fresh_token: Optional[str], entries: Iterable[FileEntry]) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "epoch": epoch, "created": created,
            "total_bytes": total_bytes, "metadata": metadata, GENERATION: generation,
            **({FRESH: fresh_token} if fresh_token else {}),
            "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in entries]}


def encode(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1).encode()


def parse_manifest(raw: bytes, expected_step: Optional[int]) -> dict:
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT:
            raise CheckpointInvalid(f"not a {FORMAT} manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise CheckpointInvalid(f"manifest version {manifest.get('version')!r} is not {FORMAT_VERSION}")
        if expected_step is not None and manifest["step"] != expected_step:
            raise CheckpointInvalid(f"manifest says step {manifest['step']}, folder says {expected_step}")
        for entry in manifest["files"]:
            rel = entry["path"]
            if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/") or rel == MANIFEST:
                raise CheckpointInvalid(f"bad file path {rel!r} in manifest")
            if not isinstance(entry["size"], int) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
                raise CheckpointInvalid(f"bad size or sha256 for {rel!r} in manifest")
        float(manifest["epoch"])
        if not isinstance(manifest.get(GENERATION, 0), int) or manifest.get(GENERATION, 0) < 0:
            raise CheckpointInvalid(f"bad generation {manifest.get(GENERATION)!r} in manifest")
        return manifest
    except CheckpointInvalid:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointInvalid(f"unreadable manifest ({describe(exc)})") from exc


def info_from_manifest(manifest: dict, name: str, uri: str) -> CheckpointInfo:
    files = tuple(FileEntry(f["path"], f["size"], f["sha256"]) for f in manifest["files"])
    return CheckpointInfo(manifest["step"], float(manifest["epoch"]), name, f"{uri}/{name}",
                          float(manifest.get("created", 0.0)), files, dict(manifest.get("metadata") or {}))


def generation_of(manifest: dict) -> int:
    return int(manifest.get(GENERATION, 0))
