"""Shared fixtures. Component harnesses live in their own modules (tests/ is on pythonpath)."""
import os
import time
from pathlib import Path

import pytest

pytest_plugins = ["testenv.fixtures", "s3_fixtures"]

EXPERIMENT_CRD = Path(__file__).resolve().parents[1] / "charts" / "dlmctl" / "crds" / "experiments.dlmctl.io.yaml"


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


# -- the test control plane as the CLI and the API service see it ---------------------------------------

@pytest.fixture(scope="session")
def experiment_crd(cluster):
    """The Experiment CRD: pre-installed through the ini option `testenv_crds` when it lists it, else here."""
    import yaml
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with cluster.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        doc = yaml.safe_load(EXPERIMENT_CRD.read_text())
        try:
            ext.read_custom_resource_definition(doc["metadata"]["name"])
        except ApiException as err:
            assert err.status == 404, err
            ext.create_custom_resource_definition(doc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conditions = ext.read_custom_resource_definition(doc["metadata"]["name"]).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                return doc
            time.sleep(0.2)
        pytest.fail("the Experiment CRD never became Established")


@pytest.fixture
def kube(cluster, experiment_crd, monkeypatch):
    """The CLI pointed at the test cluster through $KUBECONFIG, as a user's laptop would be; yields the
    (CustomObjectsApi, CoreV1Api) of the cluster's admin."""
    from kubernetes import client

    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("DLMCTL_BACKEND", raising=False)
    with cluster.api_client() as api:
        yield client.CustomObjectsApi(api), client.CoreV1Api(api)


@pytest.fixture(scope="module")
def service(cluster, s3_server, tmp_path_factory):
    """The API service (`python -m dlmctl.service`, tests/service_harness.py) for the module: its token bound to
    exactly the ClusterRole the chart ships, the S3 settings of the test store."""
    from service_harness import ServiceProcess, install_service_rbac

    process = ServiceProcess(install_service_rbac(cluster), tmp_path_factory.mktemp("service") / "service.log",
                             env=s3_server.env()).start()
    try:
        yield process
    finally:
        process.stop()
        print(f"service log: {process.log_path}")
