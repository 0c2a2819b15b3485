"""Pinned upstream versions for the test control plane.

Changing any of these means regenerating the Go modules:
``tests/testenv/build --regen-gomod`` (needs the Go module proxy).
"""

# k8s.io/kubernetes release; the staging modules (k8s.io/api, ...) are
# replaced with their published v0.<minor>.<patch> counterparts.
KUBERNETES = "v1.36.3"
# go.etcd.io/etcd/server/v3 (built through tests/testenv/etcd/main.go)
ETCD = "v3.6.8"
# sigs.k8s.io/kwok -- v0.8.0 is built against k8s.io/* v0.36.x, so it shares
# the main tool module (and the compiled k8s.io packages) with Kubernetes.
KWOK = "v0.8.0"
# helm.sh/helm/v4 -- v4.2.x is built against k8s.io/* v0.36.x as well.
HELM = "v4.2.4"
# github.com/kubeflow/training-operator (separate module: it needs k8s.io/*
# v0.31 and controller-runtime v0.19, which cannot share a build list with
# Kubernetes 1.36).
TRAINING_OPERATOR = "v1.9.3"
# sigs.k8s.io/kueue (cmd/kueue, unmodified; its own module tests/testenv/kueue: it
# needs k8s.io/* v0.35 and controller-runtime v0.23, which can share a build list
# neither with Kubernetes 1.36 nor with the training-operator).
KUEUE = "v0.17.0"
# github.com/prometheus-operator/prometheus-operator: only its ServiceMonitor and PodMonitor CRDs are used
# (buildenv.monitoring_crds), so the Helm chart's monitors can be checked by the API server.
PROMETHEUS_OPERATOR = "v0.85.0"


def staging_version(k8s_version: str = KUBERNETES) -> str:
    """v1.36.3 -> v0.36.3 (the published tag of every staging module)."""
    major, minor, patch = k8s_version.lstrip("v").split(".")[:3]
    assert major == "1", k8s_version
    return f"v0.{minor}.{patch}"
