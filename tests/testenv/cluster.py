"""Run a real Kubernetes control plane as local processes for tests.

Components (all on 127.0.0.1, ports picked at start):

* etcd
* kube-apiserver -- client-certificate auth (generated CA), RBAC
  authorization, service-account token signing keys, TokenRequest API
* kube-controller-manager -- default controllers: garbage collector,
  namespace lifecycle, service accounts, node lifecycle, ...
* kube-scheduler -- default profile (NodeResourcesFit handles nvidia.com/gpu)
* kwok -- drives fake nodes (configurable pools advertising nvidia.com/gpu) and
  their pods through kwok-stages.yaml: Pending -> Running, and Running ->
  Succeeded/Failed when the test sets the ``testenv.dlmctl.io/outcome``
  annotation (or label)
* training-operator -- Kubeflow training-operator v1 controllers (all upstream
  CRDs installed) with its validating webhooks served on 127.0.0.1
* kueue -- Kueue's controller manager (upstream CRDs, webhook configurations and
  conversion webhooks pointed at 127.0.0.1) queueing PyTorchJobs labelled
  ``kueue.x-k8s.io/queue-name``; ResourceFlavor ``gpu`` for the KWOK GPU nodes; its
  visibility API (pending workloads and their positions) aggregated into the API server
  where the fixed directory /visibility it keeps its certificate in can be written

Start-up needs only the standard library, PyYAML and openssl; ``api_client()``
and ``token_for()`` use the ``kubernetes`` client package.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import buildenv, versions

HERE = Path(__file__).resolve().parent

OUTCOME_KEY = "testenv.dlmctl.io/outcome"  # "Succeeded" | "Failed" (annotation or label)
EXIT_CODE_KEY = "testenv.dlmctl.io/exit-code"  # annotation, exit code for "Failed"
COMPLETE_AFTER_KEY = "testenv.dlmctl.io/complete-after"  # annotation, Go duration
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"

KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
KUEUE_NAMESPACE = "kueue-system"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
GPU_FLAVOR = "gpu"  # the ResourceFlavor of the KWOK GPU nodes (they carry nvidia.com/gpu.present=true)
# the names Kueue's certificate management looks for: its Configuration's defaults and config/default's
# namePrefix "kueue-" (webhook configurations kueue-{mutating,validating}-webhook-configuration)
KUEUE_WEBHOOK_SERVICE = "kueue-webhook-service"
KUEUE_WEBHOOK_SECRET = "kueue-webhook-server-cert"
KUEUE_NAME_PREFIX = "kueue-"
KUEUE_VISIBILITY_GROUP, KUEUE_VISIBILITY_VERSION = "visibility.kueue.x-k8s.io", "v1beta2"
KUEUE_VISIBILITY_SERVICE = "visibility-server"  # config/components/visibility/service.yaml
KUEUE_VISIBILITY_DIR = Path("/visibility")  # pkg/visibility/server.go: certDir, not configurable
# as Kueue's own chart: batch/job too (its Job webhook answers every batch Job and fails without it); jobs that
# name no queue are left alone (manageJobsWithoutQueueName false)
KUEUE_FRAMEWORKS = ["batch/job", "kubeflow.org/pytorchjob"]


def gpu_resource_flavor() -> dict:
    return {"apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "ResourceFlavor",
            "metadata": {"name": GPU_FLAVOR}, "spec": {"nodeLabels": {"nvidia.com/gpu.present": "true"}}}


# KWOK's Logs kind (sigs.k8s.io/kwok v0.8.0 kustomize/crd/bases), schema reduced to what is used
KWOK_LOGS_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "logs.kwok.x-k8s.io"},
    "spec": {
        "group": "kwok.x-k8s.io", "scope": "Namespaced",
        "names": {"kind": "Logs", "listKind": "LogsList", "plural": "logs", "singular": "logs"},
        "versions": [{
            "name": "v1alpha1", "served": True, "storage": True, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "required": ["logs"], "properties": {"logs": {
                    "type": "array", "items": {"type": "object", "properties": {
                        "containers": {"type": "array", "items": {"type": "string"}},
                        "logsFile": {"type": "string"}, "previousLogsFile": {"type": "string"},
                        "follow": {"type": "boolean"}}}}}},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}},
        }],
    },
}


class ClusterError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (all held open while choosing, so no two
    are the same)."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def _pdeathsig():  # runs in the child before exec
    # If the test process dies without cleaning up, the kernel sends SIGTERM
    # to the component, so nothing outlives the session.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()  # keep ^C in a terminal from reaching the components directly


def _wait_for(what: str, fn, timeout: float, interval: float = 0.2, proc=None):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        if proc is not None:
            proc.check_alive()
        try:
            out = fn()
            if out:
                return out
        except Exception as e:  # noqa: BLE001 -- keep polling, report the last error
            last_exc = e
        time.sleep(interval)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


def _yaml_docs(path: Path) -> list[dict]:
    import yaml

    with open(path) as f:  # libyaml when there is one: Kueue's CRDs are 1.6 MB
        return [d for d in yaml.load_all(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


# --------------------------------------------------------------------------
# PKI (openssl CLI)
# --------------------------------------------------------------------------

class PKI:
    """A throw-away CA and the certificates the control plane needs (ECDSA P-256)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.openssl = shutil.which("openssl")
        if not self.openssl:
            raise ClusterError("openssl is required to generate the test cluster's certificates")
        self.ca_crt, self.ca_key = self.new_ca("ca", "dlmctl-testenv-ca")

    def _ossl(self, *args):
        r = subprocess.run([self.openssl, *map(str, args)], capture_output=True, text=True)
        if r.returncode != 0:
            raise ClusterError(f"openssl {' '.join(map(str, args[:2]))} failed: {r.stderr.strip()}")

    def new_ca(self, name: str, cn: str, dns: Iterable[str] = (), rsa: bool = False) -> tuple[Path, Path]:
        """A self-signed CA (ECDSA P-256; ``rsa``: a 2048-bit RSA key in PKCS#1 form)."""
        crt, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        if rsa:
            self._ossl("genrsa", "-out", key, "2048")
            if not key.read_text().startswith("-----BEGIN RSA PRIVATE KEY"):  # OpenSSL 3 writes PKCS#8
                self._ossl("rsa", "-in", key, "-out", key, "-traditional")
            new_key = ["-key", key]
        else:
            new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key]
        sans = ["-addext", "subjectAltName=" + ",".join(f"DNS:{d}" for d in dns)] if dns else []
        self._ossl("req", "-x509", *new_key, "-out", crt, "-days", "3650", "-subj", f"/CN={cn}",
                   "-addext", "basicConstraints=critical,CA:TRUE",
                   "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", *sans)
        return crt, key

    def issue(self, name: str, cn: str, orgs: Iterable[str] = (), server: bool = False,
              client: bool = False, ips: Iterable[str] = (), dns: Iterable[str] = (),
              ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
        """A certificate signed by the CA (``ca``: another one, as (certificate, key))."""
        ca_crt, ca_key = ca or (self.ca_crt, self.ca_key)
        crt, key, csr = self.dir / f"{name}.crt", self.dir / f"{name}.key", self.dir / f"{name}.csr"
        subj = "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"
        self._ossl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                   "-nodes", "-keyout", key, "-out", csr, "-subj", subj)
        eku = [u for u, on in (("serverAuth", server), ("clientAuth", client)) if on]
        ext = ["basicConstraints=critical,CA:FALSE",
               "keyUsage=critical,digitalSignature,keyEncipherment",
               f"extendedKeyUsage={','.join(eku)}"]
        sans = [f"IP:{i}" for i in ips] + [f"DNS:{d}" for d in dns]
        if sans:
            ext.append("subjectAltName=" + ",".join(sans))
        extfile = self.dir / f"{name}.ext"
        extfile.write_text("\n".join(ext) + "\n")
        self._ossl("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
                   "-CAcreateserial", "-out", crt, "-days", "365", "-extfile", extfile)
        csr.unlink()
        extfile.unlink()
        return crt, key

    def service_account_keys(self) -> tuple[Path, Path]:
        key, pub = self.dir / "sa.key", self.dir / "sa.pub"
        self._ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                   "-out", key)
        self._ossl("pkey", "-in", key, "-pubout", "-out", pub)
        return key, pub


def write_kubeconfig(path: Path, server: str, ca: Path, *, cert: Path | None = None,
                     key: Path | None = None, token: str | None = None,
                     user: str = "admin", namespace: str | None = None) -> Path:
    """Write a kubeconfig (JSON is valid YAML) with embedded credentials."""
    b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
    u: dict[str, Any] = {}
    if cert:
        u["client-certificate-data"] = b64(cert)
        u["client-key-data"] = b64(key)
    if token:
        u["token"] = token
    ctx: dict[str, Any] = {"cluster": "dlmctl-testenv", "user": user}
    if namespace:
        ctx["namespace"] = namespace
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "dlmctl-testenv",
                      "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": u}],
        "contexts": [{"name": "dlmctl-testenv", "context": ctx}],
        "current-context": "dlmctl-testenv",
    }
    path.write_text(json.dumps(cfg, indent=2))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------
# minimal REST client (stdlib) used to bootstrap the cluster
# --------------------------------------------------------------------------

class RestClient:
    def __init__(self, server: str, ca: Path, cert: Path, key: Path):
        self.server = server.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.ctx.load_cert_chain(str(cert), str(key))

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json", timeout: float = 30,
                ok_codes: tuple = ()) -> Any:
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            if e.code in ok_codes:
                return None
            detail = e.read().decode(errors="replace")
            raise ClusterError(f"{method} {path}: HTTP {e.code}: {detail[:2000]}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def create(self, path: str, obj: dict, exist_ok: bool = True):
        return self.request("POST", path, obj, ok_codes=(409,) if exist_ok else ())


# --------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------

class Component:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Component":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(("$ " + " ".join(self.argv) + "\n").encode())
        log.flush()
        env = dict(os.environ if self.env is None else self.env)
        # the components must never talk to a cluster the developer has configured
        env.pop("KUBECONFIG", None)
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env,
                                     preexec_fn=_pdeathsig, close_fds=True)
        log.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self):
        if self.proc is not None and self.proc.poll() is not None:
            raise ClusterError(f"{self.name} exited with code {self.proc.returncode}; "
                               f"last log lines:\n{self.tail()}")

    def tail(self, n: int = 30, width: int = 400) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(l if len(l) <= width else l[:width] + " ..." for l in lines[-n:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL after ``grace`` seconds."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


# --------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------

@dataclass
class NodePool:
    count: int = 4
    gpus: int = 8
    cpu: str = "96"
    memory: str = "1Ti"
    pods: str = "110"
    name: str = "kwok-gpu"
    labels: dict = field(default_factory=dict)
    taints: list = field(default_factory=list)


def parse_node_pools(spec: str) -> list[NodePool]:
    """``"4x8"`` -> 4 nodes with 8 GPUs; ``"2x8,1x0"`` -> two pools (pool i named kwok-p<i>)."""
    pools = []
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    for i, part in enumerate(parts):
        count, _, gpus = part.partition("x")
        name = "kwok-gpu" if len(parts) == 1 else f"kwok-p{i}"
        pools.append(NodePool(count=int(count), gpus=int(gpus or 0), name=name))
    return pools


class ClusterBase:
    """What tests use; implemented by the local Cluster and ExternalCluster."""

    kubeconfig: Path
    local: bool = False

    def api_client(self, kubeconfig: Path | str | None = None):
        """A ``kubernetes.client.ApiClient`` for the admin (or the given kubeconfig)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig or self.kubeconfig),
                                client_configuration=cfg)
        return client.ApiClient(cfg)

    def token_for(self, service_account: str, namespace: str = "default", *,
                  audiences: list[str] | None = None, expiration_seconds: int = 3600,
                  create: bool = True) -> str:
        """Mint a bound ServiceAccount token via the TokenRequest API.

        Creates the ServiceAccount (and namespace) first when ``create``.
        """
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            if create:
                for create_fn, args in (
                    (core.create_namespace,
                     (client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)),)),
                    (core.create_namespaced_service_account,
                     (namespace, client.V1ServiceAccount(
                         metadata=client.V1ObjectMeta(name=service_account)))),
                ):
                    try:
                        create_fn(*args)
                    except ApiException as e:
                        if e.status != 409:
                            raise
            spec = client.V1TokenRequestSpec(
                audiences=audiences or [], expiration_seconds=expiration_seconds)
            tr = core.create_namespaced_service_account_token(
                service_account, namespace, client.AuthenticationV1TokenRequest(spec=spec))
            return tr.status.token

    def kubeconfig_for(self, service_account: str, namespace: str = "default",
                       path: Path | str | None = None, **kw) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount (least-privilege tests)."""
        import yaml

        token = self.token_for(service_account, namespace, **kw)
        with open(self.kubeconfig) as f:
            admin = yaml.safe_load(f)
        ctx_name = admin.get("current-context")
        ctx = next(c for c in admin["contexts"] if c["name"] == ctx_name)["context"]
        cluster = next(c for c in admin["clusters"] if c["name"] == ctx["cluster"])
        user = f"system:serviceaccount:{namespace}:{service_account}"
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [cluster],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": user,
                                                    "namespace": namespace}}],
            "current-context": "sa",
        }
        if path is None:
            fd, p = tempfile.mkstemp(prefix=f"kubeconfig-{service_account}-", suffix=".yaml",
                                     dir=getattr(self, "workdir", None))
            os.close(fd)
            path = p
        path = Path(path)
        path.write_text(json.dumps(cfg, indent=2))
        path.chmod(0o600)
        return path

    # -- Kueue (kueue.x-k8s.io/v1beta2) -----------------------------------------

    kueue: "Component | None" = None  # the local cluster's Kueue process

    def kueue_served(self) -> bool:
        """Whether the API server serves kueue.x-k8s.io/v1beta2 (Kueue's CRDs are installed)."""
        return self._serves(KUEUE_GROUP, KUEUE_VERSION)

    def kueue_visibility_served(self) -> bool:
        """Whether the API server serves Kueue's visibility API (pending workloads and their places in line)."""
        return self._serves(KUEUE_VISIBILITY_GROUP, KUEUE_VISIBILITY_VERSION)

    def _serves(self, group: str, version: str) -> bool:
        from kubernetes import client

        with self.api_client() as api:
            groups = client.ApisApi(api).get_api_versions().groups
        return any(g.name == group and any(v.version == version for v in g.versions) for g in groups)

    def create_cluster_queue(self, name: str, gpus: int, cpu: str = "1000", memory: str = "10Ti",
                             preemption_within: str = "LowerPriority") -> None:
        """A ClusterQueue for every namespace (namespaceSelector {}, BestEffortFIFO) with ``gpus``
        nvidia.com/gpu, ``cpu`` and ``memory`` in the ResourceFlavor "gpu" (created when missing);
        ``preemption_within``: its preemption.withinClusterQueue (Never, LowerPriority,
        LowerOrNewerEqualPriority). Returns once Kueue reports it Active."""
        self._create_kueue_object("resourceflavors", gpu_resource_flavor(), exist_ok=True)
        flavor = {"name": GPU_FLAVOR, "resources": [
            {"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": memory},
            {"name": GPU_RESOURCE, "nominalQuota": gpus}]}
        self._create_kueue_object("clusterqueues", {
            "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "ClusterQueue", "metadata": {"name": name},
            "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO",
                     "preemption": {"withinClusterQueue": preemption_within},
                     "resourceGroups": [{"coveredResources": ["cpu", "memory", GPU_RESOURCE],
                                         "flavors": [flavor]}]}})
        self._wait_kueue_active("clusterqueues", name)

    def create_local_queue(self, namespace: str, name: str, cluster_queue: str) -> None:
        """A LocalQueue in ``namespace`` feeding ``cluster_queue``. Returns once Kueue reports it Active."""
        self._create_kueue_object("localqueues", {
            "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"clusterQueue": cluster_queue}},
            namespace=namespace)
        self._wait_kueue_active("localqueues", name, namespace)

    def create_workload_priority_class(self, name: str, value: int) -> None:
        """A WorkloadPriorityClass; a job names it in its label kueue.x-k8s.io/priority-class."""
        self._create_kueue_object("workloadpriorityclasses", {
            "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "WorkloadPriorityClass",
            "metadata": {"name": name}, "value": value})

    def _create_kueue_object(self, plural: str, body: dict, namespace: str | None = None,
                             exist_ok: bool = False) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        with self.api_client() as api:
            co = client.CustomObjectsApi(api)
            try:
                if namespace:
                    co.create_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, namespace, plural, body)
                else:
                    co.create_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, plural, body)
            except ApiException as e:
                if not (exist_ok and e.status == 409):
                    raise

    def _wait_kueue_active(self, plural: str, name: str, namespace: str | None = None,
                           timeout: float = 60) -> None:
        from kubernetes import client

        with self.api_client() as api:
            co = client.CustomObjectsApi(api)

            def conditions() -> dict:
                obj = (co.get_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, namespace, plural, name)
                       if namespace else co.get_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, plural, name))
                return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}

            try:
                _wait_for(f"{plural} {name} Active", lambda: conditions().get("Active", {}).get("status") == "True",
                          timeout)
            except ClusterError as e:
                raise ClusterError(f"{e}; conditions: {list(conditions().values())}") from None

    def logs_dir(self) -> Path | None:
        return None

    def stop(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class ExternalCluster(ClusterBase):
    """An existing cluster (``DLMCTL_TEST_KUBECONFIG``): kind, k3s, EKS, ..."""

    def __init__(self, kubeconfig: str | Path):
        self.kubeconfig = Path(kubeconfig).expanduser().resolve()
        if not self.kubeconfig.exists():
            raise ClusterError(f"DLMCTL_TEST_KUBECONFIG={kubeconfig} does not exist")

    def __repr__(self):
        return f"ExternalCluster({str(self.kubeconfig)!r})"


class Cluster(ClusterBase):
    """A local control plane. Use ``Cluster.start(...)`` (or ``with Cluster.start():``)."""

    local = True

    def __init__(self, *, node_pools: list[NodePool] | None = None, workdir: Path | str | None = None,
                 bin_dir: Path | str | None = None, webhooks: bool = True,
                 crds: Iterable[Path | str] = (), kueue: bool = True,
                 verbosity: int = 1, startup_timeout: float = 180.0):
        env_pools = os.environ.get("DLMCTL_TESTENV_NODES")
        self.node_pools = node_pools or (parse_node_pools(env_pools) if env_pools else [NodePool()])
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.extra_crds = [Path(p) for p in crds]
        self.webhooks = webhooks
        self.kueue_enabled = kueue
        self.kueue_visibility = kueue and _writable_dir(KUEUE_VISIBILITY_DIR)
        self.verbosity = verbosity
        self.startup_timeout = startup_timeout
        base = os.environ.get("DLMCTL_TESTENV_WORKDIR")
        if workdir:
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            if base:
                Path(base).mkdir(parents=True, exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix="dlmctl-testenv-", dir=base))
        self.components: list[Component] = []
        self.timings: dict[str, float] = {}
        self._stopped = False
        self.api: RestClient | None = None

    # -- public ------------------------------------------------------------

    @classmethod
    def start(cls, **kw) -> "Cluster":
        c = cls(**kw)
        try:
            c._start()
        except ClusterError as e:
            c.stop()
            raise ClusterError(f"{e}\n(test cluster logs kept in {c.logs_dir()})") from None
        except BaseException:
            c.stop()
            raise
        return c

    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    def binary(self, name: str) -> Path:
        return (self.bin_dir or buildenv.bin_dir()) / name

    def pids(self) -> dict[str, int]:
        return {c.name: c.pid for c in self.components if c.alive()}

    def stop(self, grace: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        # reverse start order: controllers first, etcd last
        for comp in reversed(self.components):
            comp.stop(grace)

    def cleanup(self, keep: bool = False) -> None:
        """Stop, and delete the working directory unless ``keep``."""
        self.stop()
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, exc_type, *exc):
        self.cleanup(keep=exc_type is not None or os.environ.get("DLMCTL_TESTENV_KEEP") == "1")

    def check_alive(self):
        for c in self.components:
            c.check_alive()

    def mark_pod(self, name: str, namespace: str, outcome: str = "Succeeded",
                 exit_code: int | None = None, after: str | None = None) -> None:
        """Tell KWOK to finish a Running pod: outcome "Succeeded" or "Failed"."""
        ann = {OUTCOME_KEY: outcome}
        if exit_code is not None:
            ann[EXIT_CODE_KEY] = str(exit_code)
        if after:
            ann[COMPLETE_AFTER_KEY] = after
        self.api.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}",
                         {"metadata": {"annotations": ann}},
                         content_type="application/merge-patch+json")

    def __repr__(self):
        return f"Cluster(server={getattr(self, 'server', None)!r}, workdir={str(self.workdir)!r})"

    # -- start-up ----------------------------------------------------------

    def _start(self):
        t0 = time.monotonic()
        if self.bin_dir is None:
            buildenv.build(quiet=True)  # seconds when cached; builds on a cold cache
        for b in buildenv.ALL_BINARIES:
            if not self.binary(b).exists():
                raise ClusterError(f"missing {self.binary(b)}; run tests/testenv/build")
        self.timings["build_check"] = time.monotonic() - t0

        t = time.monotonic()
        self._pki()
        self.timings["pki"] = time.monotonic() - t

        t = time.monotonic()
        self._start_etcd()
        self._start_apiserver()
        self.timings["etcd+apiserver"] = time.monotonic() - t

        t = time.monotonic()
        # CRDs before kube-controller-manager: its garbage collector then watches
        # PyTorchJobs (and Kueue's Workloads, which they own) from the start instead
        # of after its next 30 s discovery resync
        self._install_crds()
        if self.kueue_enabled:
            self._prepare_kueue()
        self.timings["crds"] = time.monotonic() - t
        self._start_controller_manager()
        self._start_scheduler()
        self._start_kwok()
        self._start_training_operator()
        if self.kueue_enabled:
            self._start_kueue()
        self._create_nodes()
        self._wait_ready()
        self.timings["controllers+nodes"] = time.monotonic() - t
        self.timings["total"] = time.monotonic() - t0
        (self.workdir / "cluster.json").write_text(json.dumps({
            "kubeconfig": str(self.kubeconfig), "server": self.server,
            "pids": self.pids(), "timings": self.timings,
            "versions": {"kubernetes": versions.KUBERNETES, "etcd": versions.ETCD,
                         "kwok": versions.KWOK, "training-operator": versions.TRAINING_OPERATOR,
                         **({"kueue": versions.KUEUE} if self.kueue_enabled else {})},
        }, indent=2))

    def _add(self, name: str, argv: list, env: dict | None = None) -> Component:
        comp = Component(name, argv, self.logs_dir() / f"{name}.log", env=env).start()
        self.components.append(comp)
        return comp

    def _pki(self):
        pki = self.pki = PKI(self.workdir / "pki")
        self.ca = pki.ca_crt
        self.apiserver_cert = pki.issue(
            "apiserver", "kube-apiserver", server=True, ips=["127.0.0.1", "10.96.0.1"],
            dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"])
        self.admin_cert = pki.issue("admin", "dlmctl-testenv-admin", orgs=["system:masters"],
                                    client=True)
        self.kcm_cert = pki.issue("kube-controller-manager", "system:kube-controller-manager",
                                  client=True)
        self.sched_cert = pki.issue("kube-scheduler", "system:kube-scheduler", client=True)
        self.kwok_cert = pki.issue("kwok", "kwok-controller", orgs=["system:masters"], client=True)
        # KWOK's "kubelet" endpoint (pod logs): the API server reaches it over HTTPS
        self.kwok_serving_cert = pki.issue("kwok-serving", "kwok", server=True, ips=["127.0.0.1"],
                                           dns=["localhost"])
        self.to_cert = pki.issue("training-operator", "training-operator",
                                 orgs=["system:masters"], client=True)
        self.webhook_dir = self.workdir / "webhook-certs"
        self.webhook_dir.mkdir()
        crt, key = pki.issue("webhook", "training-operator-webhook", server=True, ips=["127.0.0.1"],
                             dns=["localhost"])
        shutil.copy(crt, self.webhook_dir / "tls.crt")
        shutil.copy(key, self.webhook_dir / "tls.key")
        self.sa_key, self.sa_pub = pki.service_account_keys()
        # aggregation layer / request-header authentication (like kubeadm's front proxy)
        self.front_proxy_cert = pki.issue("front-proxy-client", "front-proxy-client", client=True)
        if self.kueue_enabled:
            self._kueue_pki()

    def _start_etcd(self):
        self.etcd_port, peer = free_port(), free_port()
        url = f"http://127.0.0.1:{self.etcd_port}"
        self.etcd_url = url
        self.etcd = self._add("etcd", [
            self.binary("etcd"),
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ])

        def healthy():
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return json.loads(r.read()).get("health") == "true"
        _wait_for("etcd /health", healthy, 60, proc=self.etcd)

    def _start_apiserver(self):
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        crt, key = self.apiserver_cert
        self.apiserver = self._add("kube-apiserver", [
            self.binary("kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={crt}", f"--tls-private-key-file={key}",
            f"--client-ca-file={self.ca}",
            f"--requestheader-client-ca-file={self.ca}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={self.front_proxy_cert[0]}",
            f"--proxy-client-key-file={self.front_proxy_cert[1]}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={self.sa_pub}",
            f"--service-account-signing-key-file={self.sa_key}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            "--profiling=false",
            "--enable-priority-and-fairness=false",
            # kubelet endpoints (KWOK's, for pod logs) by InternalIP: node names do not resolve
            "--kubelet-preferred-address-types=InternalIP",
            f"--v={self.verbosity}",
        ])
        self.api = RestClient(self.server, self.ca, *self.admin_cert)
        _wait_for("kube-apiserver /readyz", lambda: self.api.get("/readyz") == "ok", 90,
                  proc=self.apiserver)
        self.kubeconfig = write_kubeconfig(self.workdir / "admin.kubeconfig", self.server, self.ca,
                                           cert=self.admin_cert[0], key=self.admin_cert[1])

    def _component_kubeconfig(self, name: str, cert) -> Path:
        return write_kubeconfig(self.workdir / f"{name}.kubeconfig", self.server, self.ca,
                                cert=cert[0], key=cert[1], user=name)

    def _start_controller_manager(self):
        kc = self._component_kubeconfig("kube-controller-manager", self.kcm_cert)
        self.kcm_port = free_port()
        self.kcm = self._add("kube-controller-manager", [
            self.binary("kube-controller-manager"),
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={self.kcm_port}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--leader-elect=false",
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.sa_key}",
            f"--root-ca-file={self.ca}",
            f"--cluster-signing-cert-file={self.ca}",
            f"--cluster-signing-key-file={self.pki.ca_key}",
            "--cluster-name=dlmctl-testenv",
            "--allocate-node-cidrs=false",
            # namespace deletion walks every resource type; the default 20 QPS makes
            # it take seconds per namespace
            "--kube-api-qps=500", "--kube-api-burst=1000",
            "--profiling=false",
            f"--v={self.verbosity}",
        ])

    def _start_scheduler(self):
        kc = self._component_kubeconfig("kube-scheduler", self.sched_cert)
        self.scheduler_port = free_port()
        self.scheduler = self._add("kube-scheduler", [
            self.binary("kube-scheduler"),
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={self.scheduler_port}",
            f"--cert-dir={self.workdir / 'scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
            f"--v={self.verbosity}",
        ])

    def _install_crds(self):
        """The training-operator's, Kueue's, KWOK's Logs and the extra CRDs."""
        mdir = buildenv.crd_dir()
        docs = [KWOK_LOGS_CRD] + (self._kueue_crds() if self.kueue_enabled else [])
        files = sorted((mdir / "crds").glob("kubeflow.org_*.yaml")) + self.extra_crds
        for crd_file in files:
            for doc in _yaml_docs(crd_file):
                if doc.get("kind") != "CustomResourceDefinition":
                    raise ClusterError(f"{crd_file}: only CustomResourceDefinitions can be "
                                       f"pre-installed, found {doc.get('kind')}")
                docs.append(doc)
        self.crds = self.install_crds(docs)

    def install_crds(self, docs: list[dict]) -> list[str]:
        """Creates these CustomResourceDefinitions and waits until each is Established; returns their names."""
        names = []
        for doc in docs:
            self.api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
            names.append(doc["metadata"]["name"])

        def established():
            for n in names:
                crd = self.api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{n}")
                conds = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])}
                if conds.get("Established") != "True":
                    return False
            return True
        _wait_for("CRDs Established", established, 60)
        return names

    def _start_kwok(self):
        kc = self._component_kubeconfig("kwok", self.kwok_cert)
        self.kwok_port = free_port()
        self.kwok = self._add("kwok", [
            self.binary("kwok"),
            f"--kubeconfig={kc}",
            f"--config={HERE / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.1/16",
            "--node-ip=127.0.0.1",
            # the nodes' kubelet endpoint is KWOK's server: `kubectl logs` reads the files that
            # kwok.x-k8s.io/v1alpha1 Logs objects name (the pod executor creates them)
            f"--node-port={self.kwok_port}",
            f"--tls-cert-file={self.kwok_serving_cert[0]}",
            f"--tls-private-key-file={self.kwok_serving_cert[1]}",
            "--enable-crds=Logs",
            f"--server-address=127.0.0.1:{self.kwok_port}",
        ], env={**os.environ, "HOME": str(self.workdir)})  # no ~/.kwok config

    def _start_training_operator(self):
        kc = self._component_kubeconfig("training-operator", self.to_cert)
        self.webhook_port = free_port()
        self.to_probe_port = free_port()
        argv = [
            self.binary("training-operator"),
            f"--kubeconfig={kc}",
            f"--metrics-bind-address=127.0.0.1:{free_port()}",
            f"--health-probe-bind-address=127.0.0.1:{self.to_probe_port}",
            "--leader-elect=false",
            "--zap-log-level=info",
        ]
        if self.webhooks:
            argv += ["--webhook-host=127.0.0.1", f"--webhook-server-port={self.webhook_port}",
                     f"--webhook-cert-dir={self.webhook_dir}"]
        else:
            argv += ["--disable-webhooks"]
        self.training_operator = self._add("training-operator", argv)
        if self.webhooks:
            self._register_webhooks()

    def _register_webhooks(self):
        """The upstream ValidatingWebhookConfiguration, pointed at 127.0.0.1."""
        (doc,) = _yaml_docs(buildenv.crd_dir() / "webhook.yaml")
        ca_b64 = base64.b64encode(self.ca.read_bytes()).decode()
        doc["metadata"] = {"name": "validator.training-operator.kubeflow.org"}
        for wh in doc["webhooks"]:
            path = wh["clientConfig"]["service"]["path"]
            wh["clientConfig"] = {"url": f"https://127.0.0.1:{self.webhook_port}{path}",
                                  "caBundle": ca_b64}
            wh["timeoutSeconds"] = 10
        self.api.create("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
                        doc, exist_ok=False)

    # -- Kueue ---------------------------------------------------------------

    def _kueue_pki(self):
        """Kueue's certificate management (see _start_kueue) finds in its Secret a CA and a serving certificate
        it accepts, so it keeps them: the CA must be RSA in PKCS#1 form, valid for the DNS name "kueue-ca"; the
        serving certificate for <webhook service>.<namespace>.svc, and 127.0.0.1 where the API server calls."""
        self.kueue_ca = self.pki.new_ca("kueue-ca", "kueue-ca", dns=["kueue-ca"], rsa=True)
        self.kueue_serving_cert = self.pki.issue(
            "kueue-webhook", KUEUE_WEBHOOK_SERVICE, server=True, ips=["127.0.0.1"],
            dns=[f"{KUEUE_WEBHOOK_SERVICE}.{KUEUE_NAMESPACE}.svc", "localhost"], ca=self.kueue_ca)
        self.kueue_cert_dir = self.workdir / "kueue-webhook-certs"
        self.kueue_cert_dir.mkdir()
        shutil.copy(self.kueue_serving_cert[0], self.kueue_cert_dir / "tls.crt")
        shutil.copy(self.kueue_serving_cert[1], self.kueue_cert_dir / "tls.key")
        self.kueue_client_cert = self.pki.issue("kueue", "kueue", orgs=["system:masters"], client=True)
        self.kueue_webhook_port = free_port()  # in the CRDs' conversion webhooks, before Kueue starts

    def _kueue_client_config(self, path: str) -> dict:
        return {"url": f"https://127.0.0.1:{self.kueue_webhook_port}{path}",
                "caBundle": base64.b64encode(self.kueue_ca[0].read_bytes()).decode()}

    def _kueue_crds(self) -> list[dict]:
        """Kueue's CRDs as its kustomization makes them: bases plus patches that give five of them (the ones its
        certificate management injects a CA into) conversion through Kueue's webhook, here at 127.0.0.1."""
        cdir = buildenv.kueue_manifest_dir() / "crd"
        (kustomization,) = _yaml_docs(cdir / "kustomization.yaml")
        crds = {}
        for resource in kustomization["resources"]:
            for doc in _yaml_docs(cdir / resource):
                crds[doc["metadata"]["name"]] = doc
        for patch in kustomization.get("patches", []):
            (doc,) = _yaml_docs(cdir / patch["path"])
            conversion = doc["spec"]["conversion"]  # the only kind of patch there
            conversion["webhook"]["clientConfig"] = self._kueue_client_config(
                conversion["webhook"]["clientConfig"]["service"]["path"])
            crds[doc["metadata"]["name"]]["spec"]["conversion"] = conversion
        return list(crds.values())

    def _kueue_webhook_configurations(self) -> list[dict]:
        """Kueue's Mutating- and ValidatingWebhookConfiguration as its kustomizations make them (the names with
        config/default's prefix, the webhooks on pods, deployments and statefulsets skipping kube-system and
        kueue-system), every webhook pointed at 127.0.0.1."""
        import yaml

        mdir = buildenv.kueue_manifest_dir()
        (kustomization,) = _yaml_docs(mdir / "webhook-kustomization.yaml")
        patched = {}
        for patch in kustomization.get("patches", []):
            doc = yaml.safe_load(patch["patch"])
            for wh in doc["webhooks"]:
                patched[(doc["kind"], wh["name"])] = wh
        docs = _yaml_docs(mdir / "webhook.yaml")
        for doc in docs:
            doc["metadata"] = {"name": KUEUE_NAME_PREFIX + doc["metadata"]["name"]}
            for wh in doc["webhooks"]:
                wh.update(patched.get((doc["kind"], wh["name"]), {}))
                wh["clientConfig"] = self._kueue_client_config(wh["clientConfig"]["service"]["path"])
        return docs

    def _prepare_kueue(self):
        """What Kueue's deployment would have ready before it starts: its namespace, the Secret its certificate
        management keeps the CA and serving certificate in, and its webhook configurations."""
        b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
        self.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                               "metadata": {"name": KUEUE_NAMESPACE}})
        self.api.create(f"/api/v1/namespaces/{KUEUE_NAMESPACE}/secrets", {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": KUEUE_WEBHOOK_SECRET, "namespace": KUEUE_NAMESPACE},
            "data": {"ca.crt": b64(self.kueue_ca[0]), "ca.key": b64(self.kueue_ca[1]),
                     "tls.crt": b64(self.kueue_serving_cert[0]), "tls.key": b64(self.kueue_serving_cert[1])}},
            exist_ok=False)
        for doc in self._kueue_webhook_configurations():
            self.api.create(f"/apis/admissionregistration.k8s.io/v1/{doc['kind'].lower()}s", doc,
                            exist_ok=False)
        if self.kueue_visibility:
            self._register_kueue_visibility()

    def _register_kueue_visibility(self):
        """Kueue's APIService as upstream's (config/components/visibility), its Service an ExternalName for
        localhost: the aggregator dials an ExternalName directly, where a ClusterIP would need kube-proxy.
        Upstream's APIService skips TLS verification too: the server signs its own certificate."""
        self.kueue_visibility_port = free_port()
        self.api.create(f"/api/v1/namespaces/{KUEUE_NAMESPACE}/services", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": KUEUE_VISIBILITY_SERVICE, "namespace": KUEUE_NAMESPACE},
            "spec": {"type": "ExternalName", "externalName": "localhost"}}, exist_ok=False)
        self.api.create("/apis/apiregistration.k8s.io/v1/apiservices", {
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": {"name": f"{KUEUE_VISIBILITY_VERSION}.{KUEUE_VISIBILITY_GROUP}"},
            "spec": {"group": KUEUE_VISIBILITY_GROUP, "version": KUEUE_VISIBILITY_VERSION,
                     "groupPriorityMinimum": 100, "versionPriority": 100, "insecureSkipTLSVerify": True,
                     "service": {"name": KUEUE_VISIBILITY_SERVICE, "namespace": KUEUE_NAMESPACE,
                                 "port": self.kueue_visibility_port}}}, exist_ok=False)

    def _kueue_visibility_available(self) -> bool:
        service = self.api.get(f"/apis/apiregistration.k8s.io/v1/apiservices/"
                               f"{KUEUE_VISIBILITY_VERSION}.{KUEUE_VISIBILITY_GROUP}")
        return any(c["type"] == "Available" and c["status"] == "True"
                   for c in service.get("status", {}).get("conditions", []))

    def _start_kueue(self):
        """Upstream cmd/kueue with its Configuration file. Its internal certificate management is on because
        with it off cmd/kueue reads a metrics certificate from the fixed path /etc/kueue/metrics/certs; it
        keeps the certificates the harness put in its Secret and in certDir, where a kubelet would mount
        the Secret (see _kueue_pki), and injects that CA into the webhook configurations and CRDs.
        Its visibility API server runs where it can keep its self-signed certificate in /visibility."""
        kc = self._component_kubeconfig("kueue", self.kueue_client_cert)
        self.kueue_probe_port = free_port()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": KUEUE_NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.kueue_probe_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"host": "127.0.0.1", "port": self.kueue_webhook_port,
                        "certDir": str(self.kueue_cert_dir)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": True, "webhookServiceName": KUEUE_WEBHOOK_SERVICE,
                                       "webhookSecretName": KUEUE_WEBHOOK_SECRET},
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": KUEUE_FRAMEWORKS},
            "featureGates": {"VisibilityOnDemand": self.kueue_visibility},
            **({"visibilityServer": {"bindAddress": "127.0.0.1", "bindPort": self.kueue_visibility_port}}
               if self.kueue_visibility else {}),
        }
        path = self.workdir / "kueue-config.yaml"
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.kueue = self._add("kueue", [self.binary("kueue"), f"--config={path}", f"--kubeconfig={kc}"])
        self._kueue_started = time.monotonic()

    def _create_nodes(self):
        self.nodes = []
        for pool in self.node_pools:
            for i in range(pool.count):
                name = f"{pool.name}-{i}"
                res = {"cpu": pool.cpu, "memory": pool.memory, "pods": pool.pods}
                if pool.gpus:
                    res[GPU_RESOURCE] = str(pool.gpus)
                labels = {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", "type": "kwok",
                    "node.kubernetes.io/instance-type": f"kwok-{pool.gpus}gpu",
                    **({"nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.count": str(pool.gpus)} if pool.gpus else {}),
                    **pool.labels,
                }
                node = {
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": labels,
                                 "annotations": {KWOK_NODE_ANNOTATION: "fake",
                                                 "node.alpha.kubernetes.io/ttl": "0"}},
                    "spec": {"taints": list(pool.taints)} if pool.taints else {},
                    "status": {"capacity": res, "allocatable": res},
                }
                self.api.create("/api/v1/nodes", node, exist_ok=False)
                self.nodes.append(name)

    def _nodes_schedulable(self) -> bool:
        items = self.api.get("/api/v1/nodes")["items"]
        by_name = {n["metadata"]["name"]: n for n in items}
        for name in self.nodes:
            n = by_name.get(name)
            if n is None:
                return False
            conds = {c["type"]: c["status"] for c in n.get("status", {}).get("conditions", [])}
            if conds.get("Ready") != "True":
                return False
            own_taints = {json.dumps(t, sort_keys=True) for pool in self.node_pools
                          for t in pool.taints}
            for t in n.get("spec", {}).get("taints", []) or []:
                if t.get("key", "").startswith("node.kubernetes.io/"):
                    return False  # not-ready / unreachable taints still present
                if json.dumps(t, sort_keys=True) not in own_taints and t.get("effect") == "NoSchedule":
                    return False
        return True

    def _webhook_serving(self, port: int | None = None,
                         path: str = "/validate-kubeflow-org-v1-pytorchjob", ca: Path | None = None) -> bool:
        """The PyTorchJob admission handler answers (it is registered after start-up): the
        training-operator's validating one, or the one at ``port``/``path`` (``ca`` signed its certificate)."""
        ctx = ssl.create_default_context(cafile=str(ca or self.ca))
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": {"uid": "probe", "operation": "CREATE",
                              "kind": {"group": "kubeflow.org", "version": "v1", "kind": "PyTorchJob"},
                              "resource": {"group": "kubeflow.org", "version": "v1",
                                           "resource": "pytorchjobs"},
                              "object": {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                                         "metadata": {"name": "probe"}}}}
        req = urllib.request.Request(
            f"https://127.0.0.1:{port or self.webhook_port}{path}",
            data=json.dumps(review).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
            return json.loads(r.read()).get("response", {}).get("uid") == "probe"

    def _wait_ready(self):
        deadline = self.startup_timeout

        def probe(port, path="/healthz", scheme="https"):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert of the component
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}{path}", context=ctx,
                                        timeout=2) as r:
                return r.status == 200

        _wait_for("kube-controller-manager /healthz", lambda: probe(self.kcm_port), deadline,
                  proc=self.kcm)
        _wait_for("kube-scheduler /healthz", lambda: probe(self.scheduler_port), deadline,
                  proc=self.scheduler)
        _wait_for("training-operator /readyz",
                  lambda: probe(self.to_probe_port, "/readyz", "http"), deadline,
                  proc=self.training_operator)
        if self.webhooks:
            _wait_for("training-operator webhook handlers", self._webhook_serving, deadline,
                      proc=self.training_operator)
        if self.kueue_enabled:
            _wait_for("kueue /readyz", lambda: probe(self.kueue_probe_port, "/readyz", "http"), deadline,
                      proc=self.kueue)
            _wait_for("kueue PyTorchJob webhook", lambda: self._webhook_serving(
                self.kueue_webhook_port, "/mutate-kubeflow-org-v1-pytorchjob", self.kueue_ca[0]), deadline,
                      proc=self.kueue)
            # through the API server and Kueue's ResourceFlavor webhooks
            _wait_for("ResourceFlavor gpu", lambda: self.api.create(
                f"/apis/{KUEUE_GROUP}/{KUEUE_VERSION}/resourceflavors", gpu_resource_flavor()) or True,
                      deadline, proc=self.kueue)
            if self.kueue_visibility:
                _wait_for("Kueue's visibility API available", self._kueue_visibility_available, deadline,
                          proc=self.kueue)
            # from its start; its certificate set-up polls in backoff steps of 1-2 s, 2-4 s, ...
            self.timings["kueue"] = time.monotonic() - self._kueue_started
        _wait_for("KWOK nodes Ready and untainted", self._nodes_schedulable, deadline,
                  proc=self.kwok)
        # ServiceAccount admission needs the "default" SA before pods can be created.
        _wait_for("default ServiceAccount",
                  lambda: self.api.get("/api/v1/namespaces/default/serviceaccounts/default",
                                       ok_codes=(404,)), deadline, proc=self.kcm)
        self.check_alive()


def from_environment(**kw) -> ClusterBase:
    """``DLMCTL_TEST_KUBECONFIG`` -> ExternalCluster; otherwise start a local Cluster."""
    ext = os.environ.get("DLMCTL_TEST_KUBECONFIG")
    if ext:
        return ExternalCluster(ext)
    return Cluster.start(**kw)


def main(argv: list[str] | None = None) -> int:
    """``tests/testenv/up``: start the cluster, print the kubeconfig, run until ^C."""
    import argparse

    ap = argparse.ArgumentParser(prog="tests/testenv/up", description=main.__doc__)
    ap.add_argument("--nodes", default=os.environ.get("DLMCTL_TESTENV_NODES", "4x8"),
                    help='KWOK node pools, "COUNTxGPUS[,COUNTxGPUS...]" (default 4x8)')
    ap.add_argument("--workdir", help="directory for certs, etcd data, logs (default: a new tmp dir)")
    ap.add_argument("--no-webhooks", action="store_true",
                    help="run the training-operator without its validating webhooks")
    ap.add_argument("--no-kueue", action="store_true", help="without Kueue (its CRDs, webhooks, controller)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory on exit")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    c = Cluster.start(node_pools=parse_node_pools(args.nodes), workdir=args.workdir,
                      webhooks=not args.no_webhooks, kueue=not args.no_kueue)
    print(f"cluster up in {time.monotonic() - t0:.1f}s ({versions.KUBERNETES})", file=sys.stderr)
    print(f"  logs: {c.logs_dir()}", file=sys.stderr)
    print(f"  pids: {c.pids()}", file=sys.stderr)
    print(f"  export KUBECONFIG={c.kubeconfig}", file=sys.stderr)
    print(f"  kubectl: {c.binary('kubectl')}   helm: {c.binary('helm')}", file=sys.stderr)
    print("Ctrl-C to stop.", file=sys.stderr)
    print(c.kubeconfig, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            for comp in c.components:
                if not comp.alive():
                    print(f"{comp.name} exited ({comp.proc.returncode}); see {comp.log_path}",
                          file=sys.stderr)
                    stop.set()
    finally:
        c.cleanup(keep=args.keep or bool(args.workdir))
        print("stopped", file=sys.stderr)
    return 0
