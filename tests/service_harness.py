"""The dlmctl API service as the tests and benchmarks run it: a real `python -m dlmctl.service` process,
authenticated with a ServiceAccount token bound to exactly the ClusterRole that `dlmctl.service.manifests` ships
(as the chart binds it), against the test control plane; and callers: ServiceAccount tokens with a Role on
Experiments in one namespace."""
from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Optional

from kubernetes import client
from kubernetes.client.rest import ApiException

from dlmctl.service import manifests
from dlmctl.spec import GROUP, PLURAL
from operator_harness import ChildProcess, wait_until
from testenv.cluster import free_port

SERVICE_NAMESPACE = "dlmctl-system"
# What a researcher may do with Experiments in their namespace; the service acts as them, so this is what it can do.
RESEARCHER_RULES = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "create", "update", "patch",
                                                            "delete"]},
    {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
]


def _create_or_replace(create, replace, body: dict) -> None:
    """create(body), or replace(name, body) when it exists (namespaced calls take the namespace first)."""
    namespace = [body["metadata"]["namespace"]] if "namespace" in body["metadata"] else []
    try:
        create(*namespace, body)
    except ApiException as err:
        if err.status != 409:
            raise
        replace(body["metadata"]["name"], *namespace, body)


def install_service_rbac(cluster, namespace: str = SERVICE_NAMESPACE) -> Path:
    """The service's ClusterRole and binding; returns a kubeconfig for its ServiceAccount."""
    kubeconfig = cluster.kubeconfig_for(manifests.NAME, namespace)
    with cluster.api_client() as api:
        rbac = client.RbacAuthorizationV1Api(api)
        _create_or_replace(rbac.create_cluster_role, rbac.replace_cluster_role, manifests.cluster_role())
        _create_or_replace(rbac.create_cluster_role_binding, rbac.replace_cluster_role_binding,
                           manifests.cluster_role_binding(namespace))
    return kubeconfig


def grant_experiments(cluster, namespace: str, service_account: str = "researcher",
                      rules: list[dict] = RESEARCHER_RULES) -> str:
    """A ServiceAccount in `namespace` (both created if missing) with `rules` there; returns its token."""
    token = cluster.token_for(service_account, namespace)
    with cluster.api_client() as api:
        rbac = client.RbacAuthorizationV1Api(api)
        name = f"{service_account}-experiments"
        role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": name, "namespace": namespace}, "rules": rules}
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": name, "namespace": namespace},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                   "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]}
        _create_or_replace(rbac.create_namespaced_role, rbac.replace_namespaced_role, role)
        _create_or_replace(rbac.create_namespaced_role_binding, rbac.replace_namespaced_role_binding, binding)
    return token


class ServiceProcess(ChildProcess):
    """`python -m dlmctl.service` on a free loopback port, its settings from the environment (DLMCTL_SERVICE_*)."""
    title = "the service"

    def __init__(self, kubeconfig: Path, log_path: Path, env: Optional[dict] = None, port: Optional[int] = None):
        super().__init__(log_path)
        self.kubeconfig = kubeconfig
        self.port = port or free_port()
        self.env = {**os.environ, **(env or {}), "DLMCTL_SERVICE_KUBECONFIG": str(kubeconfig),
                    "DLMCTL_SERVICE_HOST": "127.0.0.1", "DLMCTL_SERVICE_PORT": str(self.port)}
        self.env.pop("KUBECONFIG", None)  # only its own credentials

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "ServiceProcess":
        self.spawn("-m", "dlmctl.service", env=self.env)
        wait_until(f"the service's /readyz on {self.url}", lambda: self.answers("/readyz"), timeout=timeout,
                   check=self.check_alive)
        return self

    def answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
