"""What installs the operator on a cluster: its least-privilege RBAC, the peering its replicas share,
and the Deployment. `python -m dlmctl.operator manifests` prints them (the Helm chart will template
the same objects); the tests run the operator with a token bound to exactly `CLUSTER_ROLE_RULES`."""
from __future__ import annotations

from typing import Any

from dlmctl.spec import GROUP, PLURAL
from dlmctl.spec.sections import ResourcesSpec

from .jobs import JOB_GROUP, JOB_PLURAL
from .kueue import GROUP as KUEUE_GROUP, LOCAL_QUEUES, VISIBILITY_GROUP, WORKLOAD_PRIORITY_CLASSES, WORKLOADS

NAME = "dlmctl-operator"
PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
DEFAULT_IMAGE = ResourcesSpec.model_fields["image"].default  # one image runs the trainer and the operator

# Every verb here is used, and nothing else is granted (tests/test_operator.py proves both).
CLUSTER_ROLE_RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": [JOB_GROUP], "resources": [JOB_PLURAL], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch", "create", "patch"]},
    {"apiGroups": [KUEUE_GROUP], "resources": [WORKLOADS], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [KUEUE_GROUP], "resources": [WORKLOAD_PRIORITY_CLASSES], "verbs": ["list", "watch"]},
    {"apiGroups": [VISIBILITY_GROUP], "resources": [f"{LOCAL_QUEUES}/pendingworkloads"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [PEERING_GROUP], "resources": ["clusterkopfpeerings"], "verbs": ["get", "list", "watch", "patch", "create"]},
]


def cluster_role(name: str = NAME, rules: list[dict[str, Any]] = CLUSTER_ROLE_RULES) -> dict[str, Any]:
    """The ClusterRole `name` granting `rules` (the operator's by default; the service passes its own)."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": _labels(name)}, "rules": rules}


def cluster_role_binding(namespace: str, service_account: str = NAME, name: str = NAME) -> dict[str, Any]:
    """Binds the ClusterRole `name` to the ServiceAccount `service_account` in `namespace`."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": _labels(name)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }


def peering(name: str = "dlmctl") -> dict[str, Any]:
    return {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": "ClusterKopfPeering",
            "metadata": {"name": name, "labels": _labels()}}


def peering_crd() -> dict[str, Any]:
    """kopf keeps each replica's heartbeat and priority in the status of this cluster-scoped object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"clusterkopfpeerings.{PEERING_GROUP}", "labels": {"app.kubernetes.io/part-of": "dlmctl"}},
        "spec": {
            "group": PEERING_GROUP, "scope": "Cluster",
            "names": {"plural": "clusterkopfpeerings", "singular": "clusterkopfpeering", "kind": "ClusterKopfPeering"},
            "versions": [{
                "name": PEERING_VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}},
            }],
        },
    }


def deployment(namespace: str, image: str = DEFAULT_IMAGE, replicas: int = 2) -> dict[str, Any]:
    labels = _labels()
    container = {
        "name": "operator",
        "image": image,
        "command": ["python", "-m", "dlmctl.operator"],
        "env": [{"name": "DLMCTL_OPERATOR_METRICS_PORT", "value": "8080"},
                {"name": "DLMCTL_OPERATOR_HEALTH_PORT", "value": "8081"},
                # glibc gives every reconcile thread its own malloc arena otherwise: +100s of MB of RSS
                {"name": "MALLOC_ARENA_MAX", "value": "2"}],
        # S3 credentials to read runs' progress from their checkpoint stores (optional).
        "envFrom": [{"secretRef": {"name": "dlmctl-s3-credentials", "optional": True}}],
        "ports": [{"name": "metrics", "containerPort": 8080}, {"name": "health", "containerPort": 8081}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 20},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": replicas,  # kopf peering keeps one active; the other takes over when it goes
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}},
                "spec": {"serviceAccountName": NAME, "containers": [container],
                         "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}},
            },
        },
    }


def install_manifests(namespace: str = "dlmctl-system", image: str = DEFAULT_IMAGE, replicas: int = 2) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": _labels()}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, "namespace": namespace,
                                                                    "labels": _labels()}},
        cluster_role(),
        cluster_role_binding(namespace),
        peering(),
        deployment(namespace, image, replicas),
    ]


def _labels(name: str = NAME) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "dlmctl"}
