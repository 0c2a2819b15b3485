"""Shared fixtures. Component harnesses live in their own modules (tests/ is on pythonpath)."""
import os

import pytest

pytest_plugins = ["testenv.fixtures", "s3_fixtures"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own $DLMCTL_HOME; the token cache is shared by the session (it is content-keyed)."""
    home = tmp_path_factory.mktemp("dlmctl-home")
    monkeypatch.setenv("DLMCTL_HOME", str(home))
    # No AWS client of a test may look for credentials at the cloud's instance-metadata address.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("DLMCTL_CACHE", os.environ.get("DLMCTL_TEST_CACHE", str(_session_cache(tmp_path_factory))))
    return home


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """A $DLMCTL_HOME that does not exist yet (any write under it shows), and no cluster configured."""
    path = tmp_path / "dlmctl-home"
    monkeypatch.setenv("DLMCTL_HOME", str(path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("DLMCTL_BACKEND", raising=False)
    return path


@pytest.fixture
def single_thread():
    """Tiny models run fastest single-threaded on a shared CPU."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


_cache = None


def _session_cache(factory):
    global _cache
    if _cache is None:
        _cache = factory.mktemp("token-cache")
    return _cache


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory):
    """A real Prometheus for the session (tests/prometheus_server.py); tests add their scrape targets."""
    from prometheus_server import PrometheusServer, prometheus_binary

    if prometheus_binary() is None:
        pytest.skip("the `prometheus` binary is missing (apt-get install -y prometheus)")
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus")).start()
    yield server
    server.stop()
