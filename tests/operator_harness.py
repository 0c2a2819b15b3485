"""The dlmctl operator as the tests run it: a real `python -m dlmctl.operator` process, authenticated
with a ServiceAccount token bound to exactly the ClusterRole that `dlmctl.operator.manifests` ships,
against the test control plane. Also: submitting Experiments and waiting for their status."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from dlmctl.operator import manifests
from dlmctl.operator.jobs import JOB_GROUP, JOB_PLURAL, JOB_VERSION, LABEL_EXPERIMENT
from dlmctl.spec import GROUP, PLURAL, VERSION
from testenv.cluster import free_port

OPERATOR_NAMESPACE = "dlmctl-system"
FAST = {  # tests do not wait for production intervals
    "DLMCTL_OPERATOR_RECONCILE_INTERVAL": "0.5",
    "DLMCTL_OPERATOR_PROGRESS_INTERVAL": "1",
    "DLMCTL_OPERATOR_RESTART_BACKOFF": "1",
    "DLMCTL_OPERATOR_PEERING_LIFETIME": "6",
    "DLMCTL_OPERATOR_KUEUE_CHECK_INTERVAL": "1",
}


def install_operator_rbac(cluster) -> Path:
    """The ClusterRole and binding of the install manifests; returns a kubeconfig for the operator's SA."""
    kubeconfig = cluster.kubeconfig_for(manifests.NAME, OPERATOR_NAMESPACE)
    with cluster.api_client() as api:
        rbac = client.RbacAuthorizationV1Api(api)
        for create, replace, body in (
            (rbac.create_cluster_role, rbac.replace_cluster_role, manifests.cluster_role()),
            (rbac.create_cluster_role_binding, rbac.replace_cluster_role_binding,
             manifests.cluster_role_binding(OPERATOR_NAMESPACE)),
        ):
            try:
                create(body)
            except ApiException as err:
                if err.status != 409:
                    raise
                replace(body["metadata"]["name"], body)
    return kubeconfig


class ChildProcess:
    """`python ARGS...` in its own session, its stdout and stderr appended to `log_path`: watched and stopped."""
    title = "the process"

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def spawn(self, *args: str, env: dict) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"{self.title} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class OperatorProcess(ChildProcess):
    title = "the operator"

    def __init__(self, kubeconfig: Path, log_path: Path, env: Optional[dict] = None):
        super().__init__(log_path)
        self.kubeconfig = kubeconfig
        self.metrics_port, self.health_port = free_port(), free_port()
        self.env = {**os.environ, **FAST, **(env or {}), "KUBECONFIG": str(kubeconfig),
                    "DLMCTL_OPERATOR_METRICS_PORT": str(self.metrics_port),
                    "DLMCTL_OPERATOR_METRICS_ADDR": "127.0.0.1",
                    "DLMCTL_OPERATOR_HEALTH_PORT": str(self.health_port)}

    def start(self) -> "OperatorProcess":
        self.spawn("-m", "dlmctl.operator", "--verbose", env=self.env)
        wait_until("the operator's metrics endpoint", lambda: self.scrape() is not None, timeout=60,
                   check=self.check_alive)
        return self

    def scrape(self) -> Optional[str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def metric(self, name: str) -> float:
        """A metric's value; 0 when the operator has not exported it yet, never when the scrape failed."""
        text = wait_until("a scrape of the operator's metrics", self.scrape, timeout=20, check=self.check_alive)
        found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(found.group(1)) if found else 0.0


def wait_until(what: str, fn: Callable, timeout: float = 60, interval: float = 0.25, check: Callable = lambda: None,
               describe: Callable = lambda: None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        check()
        last = fn()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}; {describe()}")


class Experiments:
    """Experiment objects and their PyTorchJobs in one namespace, through the admin's client."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.custom, self.core, self.namespace = client.CustomObjectsApi(api), client.CoreV1Api(api), namespace

    def create(self, name: str, spec: dict, labels: Optional[dict] = None) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Experiment",
                "metadata": {"name": name, **({"labels": labels} if labels else {})}, "spec": spec}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict:
        return self.get(name).get("status") or {}

    def runs(self, name: str) -> dict[str, dict]:
        return {r["name"]: r for r in self.status(name).get("runs") or []}

    def annotate(self, name: str, annotations: dict) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                   {"metadata": {"annotations": annotations}})

    def jobs(self, experiment: Optional[str] = None) -> list[dict]:
        selector = f"{LABEL_EXPERIMENT}={experiment}" if experiment else LABEL_EXPERIMENT
        return self.custom.list_namespaced_custom_object(JOB_GROUP, JOB_VERSION, self.namespace, JOB_PLURAL,
                                                         label_selector=selector)["items"]

    def job(self, name: str) -> Optional[dict]:
        try:
            return self.custom.get_namespaced_custom_object(JOB_GROUP, JOB_VERSION, self.namespace, JOB_PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def pods(self, run: str) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(self.namespace, label_selector=f"dlmctl.io/run={run}").items

    def wait_run(self, experiment: str, run: str, phase: str, timeout: float = 60, check=lambda: None) -> dict:
        return wait_until(f"run {run} {phase}", lambda: (
            r if (r := self.runs(experiment).get(run)) and r.get("phase") == phase else None), timeout, check=check,
            describe=lambda: f"run status: {self.runs(experiment).get(run)}; pods: {self._pod_states(run)}")

    def wait_phase(self, experiment: str, phase: str, timeout: float = 60, check=lambda: None) -> dict:
        return wait_until(f"experiment {experiment} {phase}", lambda: (
            s if (s := self.status(experiment)).get("phase") == phase else None), timeout, check=check,
            describe=lambda: f"status: {self.status(experiment)}")

    def _pod_states(self, run: str) -> list:
        return [(p.metadata.name, p.status.phase, p.status.reason,
                 [(c.state.to_dict() if c.state else None) for c in p.status.container_statuses or []])
                for p in self.pods(run)]


S3_SECRET = "s3-credentials"  # what the runs' specs name as checkpoint.credentials_secret


def create_namespace_with_s3_secret(core, namespace: str, s3_server) -> None:
    """A namespace holding the SeaweedFS credentials (its AWS_* variables) as the Secret `S3_SECRET`."""
    from kubernetes import client

    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=S3_SECRET),
        string_data={k: v for k, v in s3_server.env().items() if k.startswith("AWS_")}))
