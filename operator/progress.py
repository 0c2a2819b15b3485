"""A run's progress, read from its checkpoint store: `<checkpoint.uri>/<run>/metrics.jsonl`.

The trainer keeps that file current (spec.contracts events); the operator follows it incrementally
(only the bytes appended since the last read) and the CLI reads it from a laptop.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Optional

from dlmctl.spec import Experiment, Run
from dlmctl.spec.contracts import METRICS_FILE, RunProgress, fold_progress, parse_event


def run_store_uri(checkpoint_uri: str, run: str) -> str:
    """Every run of an experiment has its own prefix under `spec.checkpoint.uri` (as the trainer writes it)."""
    return f"{checkpoint_uri.rstrip('/')}/{run}"


def metrics_uri(run: Run) -> Optional[str]:
    uri = run.spec.checkpoint.uri
    return f"{run_store_uri(uri, run.name)}/{METRICS_FILE}" if uri and uri.startswith("s3://") else None


def s3_filesystem(endpoint_url: Optional[str] = None):
    """s3fs with credentials from this process's environment (AWS_* variables or a profile)."""
    import s3fs

    client_kwargs = {}
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"):
        client_kwargs["region_name"] = os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
    # A fresh filesystem per store endpoint; s3fs caches listings, which would hide new metrics lines.
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False,
                             config_kwargs={"retries": {"max_attempts": 2}, "connect_timeout": 5, "read_timeout": 10})


@dataclass
class _Followed:
    offset: int = 0
    last_line: bytes = b""  # the bytes just before `offset`: if they changed, the file was rewritten
    progress: RunProgress = field(default_factory=RunProgress)


class ProgressReader:
    """Follows the metrics files of many runs: each read fetches only what was appended since the last."""

    def __init__(self):
        self._followed: dict[str, _Followed] = {}
        self._filesystems: dict[Optional[str], object] = {}
        self._lock = threading.Lock()

    def _fs(self, endpoint_url: Optional[str]):
        with self._lock:
            if endpoint_url not in self._filesystems:
                self._filesystems[endpoint_url] = s3_filesystem(endpoint_url)
            return self._filesystems[endpoint_url]

    def read(self, run: Run) -> Optional[RunProgress]:
        """The run's progress so far; None when its store has no metrics yet. Storage errors propagate."""
        uri = metrics_uri(run)
        if uri is None:
            return None
        fs = self._fs(run.spec.checkpoint.endpoint_url)
        state = self._followed.setdefault(uri, _Followed())
        try:
            size = fs.size(uri)
        except FileNotFoundError:
            return None
        if size == state.offset:
            return state.progress
        start = state.offset - len(state.last_line)
        data = fs.cat_file(uri, start=start, end=size) if size > state.offset else b""
        if not data.startswith(state.last_line):
            # Rewritten: a resumed run drops the events past its checkpoint and logs them again.
            state = self._followed[uri] = _Followed()
            start, data = 0, fs.cat_file(uri)
        data = data[len(state.last_line):]
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        if end:
            lines = data[:end].splitlines()
            events = [e for e in (parse_event(_json_or_none(line)) for line in lines) if e is not None]
            progress = state.progress.model_copy(update={"evals": list(state.progress.evals)})  # no list shared
            state.progress = fold_progress(events, progress)
            state.offset += end
            state.last_line = lines[-1] + b"\n"
        return state.progress

    def forget(self, run: Run) -> None:
        uri = metrics_uri(run)
        if uri:
            self._followed.pop(uri, None)


def _json_or_none(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_progress(experiment: Experiment, reader: Optional[ProgressReader] = None
                  ) -> tuple[dict[str, RunProgress], Optional[tuple[str, Exception]]]:
    """Each run's progress from its store (run name -> progress; runs without metrics are left out), read
    through one S3 client. Reading stops at the first store that fails: that (uri, error) is returned too."""
    reader = reader or ProgressReader()
    progress: dict[str, RunProgress] = {}
    for run in experiment.runs():
        uri = metrics_uri(run)
        if uri is None:
            continue
        try:
            found = reader.read(run)
        except Exception as err:  # no s3fs, no credentials, unreachable endpoint, ...
            return progress, (uri, err)
        if found is not None:
            progress[run.name] = found
    return progress, None
