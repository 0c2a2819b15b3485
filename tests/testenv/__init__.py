"""A real Kubernetes control plane for dlmctl's tests.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK (fake GPU
nodes), the Kubeflow training-operator and Kueue, all built from upstream Go modules
(``tests/testenv/build``) and run as local processes on 127.0.0.1.

    from testenv import Cluster
    with Cluster.start() as c:
        print(c.kubeconfig)

Pytest: ``pytest_plugins = ["testenv.fixtures"]`` provides the session fixture
``cluster``.
"""

from . import versions  # noqa: F401

__all__ = ["Cluster", "ExternalCluster", "versions"]


def __getattr__(name):  # lazy: keep `import testenv` cheap
    if name in ("Cluster", "ExternalCluster"):
        from . import cluster

        return getattr(cluster, name)
    raise AttributeError(name)
