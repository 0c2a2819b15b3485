"""pytest plugin: ``pytest_plugins = ["testenv.fixtures"]``.

Fixtures
--------
``cluster`` (session)
    A running control plane (``testenv.cluster.Cluster``): ``.kubeconfig``,
    ``.api_client()``, ``.token_for(sa, namespace)``, ``.kubeconfig_for(...)``,
    ``.mark_pod(name, ns, "Succeeded"|"Failed")``, ``.nodes``, ``.logs_dir()``.
    With ``DLMCTL_TEST_KUBECONFIG`` set it is an ``ExternalCluster`` for that
    kubeconfig instead and nothing is started.  Binaries are built on first
    use if ``tests/testenv/build`` has not been run.
``cluster_namespace`` (function)
    A fresh namespace, deleted afterwards; on the local cluster its pods are
    removed at once so the next test finds every GPU free.
``kueue_queue`` (function)
    A factory: ``kueue_queue(gpus=16, name="team") -> str`` creates a ClusterQueue
    (named after the test's namespace; ``gpus`` nvidia.com/gpu in flavor "gpu",
    preemption within it of lower priorities) and the LocalQueue ``name`` in
    ``cluster_namespace`` feeding it, and returns the LocalQueue's name: label a job
    ``kueue.x-k8s.io/queue-name=<it>``. At teardown the namespace goes first, then the
    ClusterQueue. Skips the test where Kueue is not served (``DLMCTL_TEST_KUBECONFIG``).
``pod_executor`` (function)
    A started ``testenv.executor.PodExecutor`` for ``cluster_namespace``: pods
    bound to KWOK nodes there really run, as local processes, and finish with
    their exit code. ``.log_path(ns, pod)``, ``.logs(ns, pod)``, ``.run(ns, pod)``,
    ``.wait_exited(ns, pod)``. Every process it started is killed at teardown.

Environment
-----------
``DLMCTL_TEST_KUBECONFIG``   use this cluster instead of starting one
``DLMCTL_TESTENV_NODES``     KWOK node pools, e.g. ``4x8`` (default) or ``2x8,2x4``
``DLMCTL_TESTENV_KEEP=1``    keep the working directory (certs, etcd, logs) even on success
``DLMCTL_TESTENV_CACHE``     binary cache (default ``~/.cache/dlmctl/testenv``)
``DLMCTL_TESTENV_CRDS``      extra CRD files/globs (os.pathsep-separated) to install at
                             start-up; or the ini option ``testenv_crds`` (a list)

Install your own CRDs through ``testenv_crds`` rather than in a test when
ownerReferences *to* those kinds must cascade: kube-controller-manager's garbage
collector only notices kinds that appear after it started on its next 30 s
discovery resync.

When a test that uses the cluster fails, the components' log tails are added to
its report and the working directory (with full logs) is kept.
"""

from __future__ import annotations

import os
import re
import time
import uuid

import pytest

from . import cluster as _cluster

_FAILED_KEY = pytest.StashKey[bool]()
_CLUSTER_KEY = pytest.StashKey[object]()


def pytest_addoption(parser):
    parser.addini(
        "testenv_crds", type="linelist", default=[],
        help="CRD YAML files/globs (relative to rootdir) installed before "
             "kube-controller-manager starts, so its garbage collector follows "
             "ownerReferences to those kinds at once (not after a 30 s resync)")


def _extra_crds(config) -> list:
    import glob

    patterns = list(config.getini("testenv_crds"))
    patterns += [p for p in os.environ.get("DLMCTL_TESTENV_CRDS", "").split(os.pathsep) if p]
    files = []
    for pat in patterns:
        full = pat if os.path.isabs(pat) else os.path.join(str(config.rootpath), pat)
        matches = sorted(glob.glob(full))
        if not matches:
            raise pytest.UsageError(f"testenv_crds: {pat!r} matches no file")
        files += matches
    return files


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: needs a real Kubernetes control plane (tests/testenv)")


@pytest.fixture(scope="session")
def cluster(request):
    ext = os.environ.get("DLMCTL_TEST_KUBECONFIG")
    if ext:
        c = _cluster.ExternalCluster(ext)
        request.config.stash[_CLUSTER_KEY] = c
        yield c
        return
    t0 = time.monotonic()
    c = _cluster.Cluster.start(crds=_extra_crds(request.config))
    request.config.stash[_CLUSTER_KEY] = c
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"testenv: control plane {c.server} up in {time.monotonic() - t0:.1f}s "
                      f"({', '.join(f'{k} {v:.1f}s' for k, v in c.timings.items())}); "
                      f"workdir {c.workdir}")
    try:
        yield c
    finally:
        failed = request.config.stash.get(_FAILED_KEY, False)
        keep = failed or os.environ.get("DLMCTL_TESTENV_KEEP") == "1"
        c.cleanup(keep=keep)
        if keep and tr is not None:
            tr.write_line(f"testenv: logs kept in {c.logs_dir()}")


@pytest.fixture
def cluster_namespace(cluster, request):
    from kubernetes import client

    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base or 't'}-{uuid.uuid4().hex[:6]}"
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        try:
            yield name
        finally:
            _delete_namespace(cluster, core, name)


def _delete_namespace(cluster, core, name: str) -> None:
    from kubernetes.client.rest import ApiException

    try:
        core.delete_namespace(name)
        if getattr(cluster, "local", False):
            # The namespace controller waits a fixed 5 s before it empties a
            # namespace. Once it is Terminating nothing new can be created in
            # it, so remove the (KWOK) pods now: the next test finds every GPU
            # free and nobody waits for the namespace itself.
            core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
            deadline = time.monotonic() + 30
            while core.list_namespaced_pod(name).items and time.monotonic() < deadline:
                time.sleep(0.2)
    except ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture
def kueue_queue(cluster, cluster_namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    if not cluster.kueue_served():
        pytest.skip(f"Kueue ({_cluster.KUEUE_GROUP}/{_cluster.KUEUE_VERSION}) is not served by {cluster!r}")
    cluster_queues: list[str] = []

    def make(gpus: int = 16, name: str = "team") -> str:
        cluster_queue = cluster_namespace + (f"-{len(cluster_queues)}" if cluster_queues else "")
        cluster.create_cluster_queue(cluster_queue, gpus)
        cluster_queues.append(cluster_queue)
        cluster.create_local_queue(cluster_namespace, name, cluster_queue)
        return name

    yield make
    if not cluster_queues:
        return
    with cluster.api_client() as api:
        # the namespace (its jobs, Workloads, LocalQueues) and its pods first, so nothing holds the
        # ClusterQueue's quota; cluster_namespace's own teardown then finds it deleted already
        _delete_namespace(cluster, client.CoreV1Api(api), cluster_namespace)
        co = client.CustomObjectsApi(api)
        group, version = _cluster.KUEUE_GROUP, _cluster.KUEUE_VERSION
        for cq in cluster_queues:
            try:
                co.delete_cluster_custom_object(group, version, "clusterqueues", cq)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # until the get answers 404
                    co.get_cluster_custom_object(group, version, "clusterqueues", cq)
                    time.sleep(0.2)
                # Kueue keeps its finalizer while a Workload still reserves quota there: not worth a hang
                co.patch_cluster_custom_object(group, version, "clusterqueues", cq,
                                               {"metadata": {"finalizers": None}})
            except ApiException as e:
                if e.status != 404:
                    raise


@pytest.fixture
def pod_executor(cluster, cluster_namespace, tmp_path):
    from .executor import PodExecutor

    with PodExecutor(cluster, namespaces={cluster_namespace}, workdir=tmp_path / "pods") as executor:
        yield executor


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed or "cluster" not in getattr(item, "fixturenames", ()):
        return
    item.config.stash[_FAILED_KEY] = True
    c = item.config.stash.get(_CLUSTER_KEY, None)
    if isinstance(c, _cluster.Cluster):
        parts = [f"workdir (kept): {c.workdir}"]
        for comp in c.components:
            state = "running" if comp.alive() else f"exited {comp.proc.returncode}"
            parts.append(f"--- {comp.name} (pid {comp.pid}, {state}) {comp.log_path}\n"
                         f"{comp.tail(10)}")
        rep.sections.append(("testenv control plane", "\n".join(parts)))
