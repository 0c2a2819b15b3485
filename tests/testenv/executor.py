"""Run the pods bound to KWOK nodes as local processes (tests only).

KWOK pretends to run containers: a bound pod goes Running and finishes only when
the test sets ``testenv.dlmctl.io/outcome``. A ``PodExecutor`` fills that gap for
the namespaces it is given: it watches their pods and, once one is bound to a
KWOK node and Running, runs its container's command as a local process, as a
kubelet would have started it, then reports the exit through that same
annotation so KWOK terminates the pod with the process's exit code::

    with PodExecutor(cluster, namespaces={ns}, workdir=tmp_path) as ex:
        ...                       # create a PyTorchJob; its pods really run
        ex.wait_exited(ns, "job-master-0")
        print(ex.logs(ns, "job-master-0"))

What the process gets (one per pod: the container named ``pytorch``, else the first):

* argv: the container's ``command`` + ``args`` with the kubelet's ``$(VAR)`` expansion
  (``$$`` escapes, unknown references left as they are) over the container env;
* env: this process's environment (its PATH, with this interpreter's bin directory
  first, and caches; ``KUBECONFIG`` removed) + ``HOSTNAME`` + the container's
  ``envFrom`` ConfigMaps/Secrets and ``env`` (literal values expanded like the kubelet,
  ``valueFrom`` fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef);
* ``MASTER_ADDR``/``PET_MASTER_ADDR`` (the training-operator points them at the
  master's headless Service) -> ``127.0.0.1``; ``MASTER_PORT``/``PET_MASTER_PORT`` ->
  one free local port per PyTorchJob (``training.kubeflow.org/job-name`` and the job's
  uid: every pod of a job agrees, a recreated job gets a new port);
* volumes: each ``volumeMounts[].mountPath`` is replaced, wherever it appears as a
  path in command, args or env values, by a local directory: per pod for emptyDir
  and other volumes, per namespace and claim for a PersistentVolumeClaim;
  configMap/secret volumes are filled with their keys;
* cwd: a per-pod directory; stdout+stderr: ``log_path(ns, pod)`` (and a CRI-format copy that a
  ``kwok.x-k8s.io/v1alpha1`` Logs object points KWOK at, so ``kubectl logs`` shows it);
  its own process group.

When the process exits the pod is annotated Succeeded (exit 0) or Failed with
``testenv.dlmctl.io/exit-code`` (128+N after signal N). When the pod gets a
deletionTimestamp or disappears (eviction, job or namespace deletion) while its
process runs, the process group gets SIGTERM and, after the pod's grace period
(``deletionGracePeriodSeconds`` when the deletion is first seen, else
``terminationGracePeriodSeconds``, else 30 s; at least 2 s, like the kubelet), SIGKILL.
A pod whose namespace/name is still held by a running process (a recreated job's
``<job>-master-0``) starts only after that process exited. ``stop()`` kills every process group it started.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable

from .cluster import EXIT_CODE_KEY, KWOK_NODE_ANNOTATION, OUTCOME_KEY, free_port

log = logging.getLogger(__name__)

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
MASTER_ADDR_VARS = ("MASTER_ADDR", "PET_MASTER_ADDR")
MASTER_PORT_VARS = ("MASTER_PORT", "PET_MASTER_PORT")
DEFAULT_GRACE_S = 30
MIN_GRACE_S = 2  # the kubelet never gives a container less
WATCH_TIMEOUT_S = 1  # server-side watch timeout: how fast stop() returns


class ConfigError(Exception):
    """What a kubelet reports as CreateContainerConfigError (retried)."""


# --------------------------------------------------------------------------
# what a kubelet computes
# --------------------------------------------------------------------------

def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes ``$(VAR)`` expansion: ``$$`` -> ``$``, unknown references kept as written."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "$" or i + 1 == n:
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close < 0:  # incomplete reference: literal
                out.append("$(")
                i += 2
            else:
                name = text[i + 2:close]
                value = lookup(name)
                out.append(f"$({name})" if value is None else value)
                i = close + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def map_paths(text: str, mounts: dict[str, Path]) -> str:
    """Replace each mount path (longest first) where it starts a path in ``text``."""
    if not mounts:
        return text
    alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    pattern = r"(?<![\w./-])(" + alternatives + r")(?=/|$|[^\w.-])"
    return re.sub(pattern, lambda m: str(mounts[m.group(1)]), text)


_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": Decimal("0.001")}


def quantity(q: str | int | float) -> Decimal:
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?", str(q).strip())
    if not m:
        raise ConfigError(f"invalid quantity {q!r}")
    return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2) or ""])


def _field_value(pod: dict, path: str) -> str:
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"), "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(x["ip"] for x in status.get("hostIPs") or []),
        "status.podIPs": ",".join(x["ip"] for x in status.get("podIPs") or []),
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return simple[path] or ""


def _resource_value(container: dict, ref: dict) -> str:
    kind, _, name = ref["resource"].partition(".")
    res = container.get("resources") or {}
    raw = (res.get(kind) or {}).get(name)
    if raw is None and kind == "requests":
        raw = (res.get("limits") or {}).get(name)
    if raw is None:  # the kubelet falls back to node allocatable; here: this machine
        raw = os.cpu_count() if name == "cpu" else (64 * 2**30 if name == "memory" else 0)
    divisor = quantity(ref.get("divisor") or "1")
    return str(math.ceil(quantity(raw) / divisor))


def pick_container(pod: dict) -> dict:
    containers = pod["spec"]["containers"]
    return next((c for c in containers if c["name"] == "pytorch"), containers[0])


# --------------------------------------------------------------------------
# one process per pod
# --------------------------------------------------------------------------

@dataclass
class PodRun:
    """One pod's process (a recreated pod with the same name gets a new PodRun)."""

    namespace: str
    name: str
    uid: str
    dir: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # the container's env (not the inherited one)
    mounts: dict[str, Path] = field(default_factory=dict)  # mountPath -> local directory
    proc: subprocess.Popen | None = None
    started_at: float | None = None  # time.time()
    exited_at: float | None = None
    exit_code: int | None = None  # kubelet style: 128+N after signal N
    signals: list[str] = field(default_factory=list)  # what the pod's termination sent, in order
    kill_deadline: float | None = None  # monotonic; SIGKILL after it
    exited: threading.Event = field(default_factory=threading.Event)
    partial_line: bytes = b""  # output after the last newline, not yet in the CRI log

    @property
    def log_path(self) -> Path:
        return self.dir / "container.log"

    @property
    def cri_log_path(self) -> Path:
        """The same output in the CRI log format, which KWOK serves to ``kubectl logs``."""
        return self.dir / "container.cri.log"

    @property
    def cwd(self) -> Path:
        return self.dir / "cwd"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def signal(self, sig: signal.Signals, record: bool = True) -> None:
        """Signal the whole process group (the container), also after its leader exited."""
        if self.proc is None:
            return
        if record:
            self.signals.append(sig.name)
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _cri_time() -> str:
    now = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}Z"


def _write_output(run: PodRun, chunk: bytes) -> None:
    """Append to the plain log and, line by line, to the CRI log ("<time> stdout F <line>")."""
    with open(run.log_path, "ab") as f:
        f.write(chunk)
    stamp = _cri_time()
    data = run.partial_line + chunk
    *lines, run.partial_line = data.split(b"\n")
    with open(run.cri_log_path, "ab") as f:
        for line in lines:
            f.write(f"{stamp} stdout F ".encode() + line + b"\n")


def _flush_partial_line(run: PodRun) -> None:
    if run.partial_line:
        with open(run.cri_log_path, "ab") as f:
            f.write(f"{_cri_time()} stdout F ".encode() + run.partial_line + b"\n")
        run.partial_line = b""


def _child_setup():  # runs in the child before exec
    os.setsid()  # its own process group: the container
    try:  # die with the test process, like the cluster components
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class PodExecutor:
    """Watch pods in ``namespaces`` and run those bound to KWOK nodes as local processes."""

    def __init__(self, cluster, namespaces: Iterable[str], workdir: Path | str, *,
                 base_env: dict[str, str] | None = None):
        self.cluster = cluster
        self.namespaces = set(namespaces)
        self.workdir = Path(workdir)
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.base_env.pop("KUBECONFIG", None)
        bindir = os.path.dirname(sys.executable)  # the test's interpreter is the "image"
        path = self.base_env.get("PATH", os.defpath).split(os.pathsep)
        self.base_env["PATH"] = os.pathsep.join([bindir] + [p for p in path if p != bindir])

        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()  # stop watching and starting
        self._done = threading.Event()  # stop() has ended every process
        self._lock = threading.RLock()
        self._pods: dict[str, dict] = {}  # uid -> latest pod object (watched namespaces)
        self._runs: dict[tuple[str, str], list[PodRun]] = {}  # every run, in start order
        self._active: dict[tuple[str, str], PodRun] = {}  # (ns, name) -> process still running
        self._handled: set[str] = set()  # uids started (or given up)
        self._retry_at: dict[str, float] = {}  # uid -> monotonic time of the next start attempt
        self._kwok_nodes: dict[str, bool] = {}
        self._ports: dict[tuple, int] = {}
        self._threads: list[threading.Thread] = []
        self._api = None
        self.watch_restarts = 0

    # -- public ---------------------------------------------------------------

    def start(self) -> "PodExecutor":
        from kubernetes import client

        self.workdir.mkdir(parents=True, exist_ok=True)
        self._api = self.cluster.api_client()
        self._core = client.CoreV1Api(self._api)
        for target, name in ((self._watch_loop, "pod-executor-watch"), (self._control_loop, "pod-executor")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Stop watching; SIGTERM every process group, SIGKILL what is left after ``grace`` s."""
        self._stop.set()
        for t in self._threads[:1]:  # the watch
            t.join(timeout=WATCH_TIMEOUT_S + 10)
        with self._lock:
            runs = [r for rs in self._runs.values() for r in rs if r.proc is not None]
        for r in runs:
            if r.proc.poll() is None:
                r.signal(signal.SIGTERM, record=False)
        deadline = time.monotonic() + grace
        for r in runs:
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for r in runs:  # the leader and whatever it left in its group
            if r.proc.poll() is None or self._group_alive(r):
                r.signal(signal.SIGKILL, record=False)
            try:
                r.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self._mark_exited(r)
        self._done.set()
        for t in self._threads[1:]:
            t.join(timeout=10)
        self._threads = []
        if self._api is not None:
            self._api.close()
            self._api = None

    def __enter__(self) -> "PodExecutor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_namespace(self, namespace: str) -> None:
        with self._lock:
            self.namespaces.add(namespace)
        self._events.put(("resync",))

    def runs(self, namespace: str, pod: str) -> list[PodRun]:
        """Every process started for pods named ``pod`` (oldest first)."""
        with self._lock:
            return list(self._runs.get((namespace, pod), []))

    def run(self, namespace: str, pod: str) -> PodRun:
        """The newest process for pod ``pod``; KeyError if none started yet."""
        runs = self.runs(namespace, pod)
        if not runs:
            raise KeyError(f"no process was started for pod {namespace}/{pod}")
        return runs[-1]

    def log_path(self, namespace: str, pod: str) -> Path:
        """The newest process's stdout+stderr file."""
        return self.run(namespace, pod).log_path

    def logs(self, namespace: str, pod: str) -> str:
        """The newest process's output so far ('' if none started)."""
        try:
            return self.log_path(namespace, pod).read_text(errors="replace")
        except (KeyError, FileNotFoundError):
            return ""

    def wait_started(self, namespace: str, pod: str, timeout: float = 60, after: int = 0) -> PodRun:
        """Wait for process number ``after`` + 1 of pod ``pod`` to start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.runs(namespace, pod)
            if len(runs) > after and runs[after].started_at is not None:
                return runs[after]
            time.sleep(0.05)
        raise TimeoutError(f"no process started for pod {namespace}/{pod} within {timeout}s; "
                           f"{self._pods_summary(namespace)}")

    def wait_exited(self, namespace: str, pod: str, timeout: float = 60) -> PodRun:
        """Wait for the newest process of pod ``pod`` to exit (starting it first if need be)."""
        deadline = time.monotonic() + timeout
        run = self.wait_started(namespace, pod, timeout)
        if not run.exited.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"pod {namespace}/{pod} (pid {run.pid}) still running after {timeout}s; "
                               f"output:\n{self.logs(namespace, pod)[-2000:]}")
        return run

    # -- watching ---------------------------------------------------------------

    def _watch_loop(self) -> None:
        from kubernetes import client, watch
        from kubernetes.client.rest import ApiException

        with self.cluster.api_client() as api:
            core = client.CoreV1Api(api)
            rv = None
            while not self._stop.is_set():
                try:
                    if rv is None:
                        listed = api.sanitize_for_serialization(core.list_pod_for_all_namespaces())
                        rv = listed["metadata"]["resourceVersion"]
                        items = listed.get("items") or []
                        self._events.put(("sync", items))
                    w = watch.Watch()
                    for ev in w.stream(core.list_pod_for_all_namespaces, resource_version=rv,
                                       timeout_seconds=WATCH_TIMEOUT_S, allow_watch_bookmarks=False,
                                       _request_timeout=WATCH_TIMEOUT_S + 30):
                        self._events.put(("event", ev["type"], ev["raw_object"]))
                        rv = ev["raw_object"]["metadata"].get("resourceVersion") or rv
                        if self._stop.is_set():
                            break
                except ApiException as e:
                    if e.status != 410:
                        log.warning("pod watch failed (%s); re-listing", e)
                        self._stop.wait(0.5)
                    rv = None
                    self.watch_restarts += 1
                except Exception as e:  # noqa: BLE001 -- connection errors: re-list and re-watch
                    if self._stop.is_set():
                        break
                    log.warning("pod watch failed (%r); re-listing", e)
                    rv = None
                    self.watch_restarts += 1
                    self._stop.wait(0.5)

    # -- deciding -----------------------------------------------------------------

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._events.get(timeout=0.1)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._handle(item)
                self._enforce_deadlines()
                self._start_ready_pods()
            except Exception:  # noqa: BLE001 -- never let one pod stop the executor
                log.exception("pod executor error")
        # The processes' PR_SET_PDEATHSIG fires when the thread that started them ends:
        # stay until stop() has ended them itself.
        self._done.wait()

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "sync":  # a fresh list: what is not in it was deleted meanwhile
            items = [p for p in item[1] if p["metadata"]["namespace"] in self.namespaces]
            uids = {p["metadata"]["uid"] for p in items}
            with self._lock:
                for uid in [u for u in self._pods if u not in uids]:
                    self._gone(self._pods.pop(uid))
            for p in items:
                self._update(p)
        elif kind == "event":
            _, etype, pod = item
            if pod.get("kind") not in (None, "Pod") or pod["metadata"]["namespace"] not in self.namespaces:
                return
            if etype == "DELETED":
                with self._lock:
                    self._pods.pop(pod["metadata"]["uid"], None)
                self._gone(pod)
            else:
                self._update(pod)
        elif kind == "exited":
            self._finish(item[1])

    def _update(self, pod: dict) -> None:
        with self._lock:
            self._pods[pod["metadata"]["uid"]] = pod
        if pod["metadata"].get("deletionTimestamp"):
            self._gone(pod)

    def _gone(self, pod: dict) -> None:
        """The pod is being deleted (or is gone): stop its process like the kubelet."""
        meta = pod["metadata"]
        with self._lock:
            run = self._active.get((meta["namespace"], meta["name"]))
            self._handled.add(meta["uid"])  # never start a pod that is going away
        if run is None or run.uid != meta["uid"]:
            return
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod.get("spec", {}).get("terminationGracePeriodSeconds")
        grace = max(MIN_GRACE_S, DEFAULT_GRACE_S if grace is None else int(grace))
        # The grace period is the one seen first: KWOK removes a terminating pod at once (a
        # force deletion, grace 0), which must not cut the process's grace period short.
        if run.kill_deadline is None:
            run.signal(signal.SIGTERM)
            run.kill_deadline = time.monotonic() + grace

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [r for r in self._active.values()
                       if r.kill_deadline is not None and now >= r.kill_deadline and "SIGKILL" not in r.signals]
        for r in overdue:
            r.signal(signal.SIGKILL)

    def _start_ready_pods(self) -> None:
        now = time.monotonic()
        with self._lock:
            candidates = [p for uid, p in self._pods.items()
                          if uid not in self._handled and self._retry_at.get(uid, 0) <= now
                          and p["metadata"]["namespace"] in self.namespaces]
        for pod in sorted(candidates, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
            meta = pod["metadata"]
            if (pod.get("status", {}).get("phase") != "Running" or meta.get("deletionTimestamp")
                    or (meta.get("annotations") or {}).get(OUTCOME_KEY)
                    or not self._on_kwok_node(pod)):
                continue
            with self._lock:
                if (meta["namespace"], meta["name"]) in self._active:
                    continue  # the previous pod of that name still has its process: wait for it
            try:
                self._launch(pod)
            except ConfigError as e:  # like CreateContainerConfigError: retried
                log.warning("pod %s/%s: %s (retrying)", meta["namespace"], meta["name"], e)
                with self._lock:
                    self._retry_at[meta["uid"]] = time.monotonic() + 1.0

    def _on_kwok_node(self, pod: dict) -> bool:
        node = pod.get("spec", {}).get("nodeName")
        if not node:
            return False
        if node not in self._kwok_nodes:
            from kubernetes.client.rest import ApiException
            try:
                ann = self._core.read_node(node).metadata.annotations or {}
            except ApiException:
                return False
            self._kwok_nodes[node] = ann.get(KWOK_NODE_ANNOTATION) == "fake"
        return self._kwok_nodes[node]

    # -- running ------------------------------------------------------------------

    def _launch(self, pod: dict) -> None:
        meta = pod["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        container = pick_container(pod)
        run = PodRun(ns, name, uid, self.workdir / ns / name / uid[:8])
        run.mounts = self._prepare_volumes(pod, container, run)
        run.env = self._container_env(pod, container, run.mounts)
        lookup = run.env.get
        run.argv = [map_paths(expand(a, lookup), run.mounts)
                    for a in (container.get("command") or []) + (container.get("args") or [])]
        run.cwd.mkdir(parents=True, exist_ok=True)
        env = {**self.base_env, "HOSTNAME": pod.get("spec", {}).get("hostname") or name, **run.env}
        with self._lock:
            self._handled.add(uid)
            self._retry_at.pop(uid, None)
            self._runs.setdefault((ns, name), []).append(run)
            self._active[(ns, name)] = run
        run.log_path.touch()
        run.cri_log_path.touch()
        self._serve_logs(run, container["name"])
        try:
            if not run.argv:
                raise FileNotFoundError("the container has no command: the executor cannot run an "
                                        "image's entrypoint")
            run.proc = subprocess.Popen(run.argv, cwd=run.cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, close_fds=True,
                                        preexec_fn=_child_setup)
        except OSError as e:  # what a runtime reports as a StartError, exit code 127/128
            _write_output(run, f"executor: cannot start {run.argv[:1]}: {e}\n".encode())
            run.started_at = time.time()
            run.exit_code = 127 if isinstance(e, FileNotFoundError) else 128
            self._events.put(("exited", run))
            return
        run.started_at = time.time()
        log.info("pod %s/%s: started pid %d: %s", ns, name, run.proc.pid, run.argv)
        threading.Thread(target=self._reap, args=(run,), name=f"reap-{name}", daemon=True).start()

    def _serve_logs(self, run: PodRun, container: str) -> None:
        """Point a kwok.x-k8s.io Logs object at the run's CRI log: ``kubectl logs`` then shows it."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        body = {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Logs",
                "metadata": {"name": run.name, "namespace": run.namespace},
                "spec": {"logs": [{"containers": [container], "logsFile": str(run.cri_log_path)}]}}
        co = client.CustomObjectsApi(self._api)
        try:
            try:
                co.create_namespaced_custom_object("kwok.x-k8s.io", "v1alpha1", run.namespace, "logs", body)
            except ApiException as e:
                if e.status != 409:
                    raise
                co.patch_namespaced_custom_object("kwok.x-k8s.io", "v1alpha1", run.namespace, "logs", run.name,
                                                  {"spec": body["spec"]})
        except ApiException as e:  # a cluster without KWOK's Logs kind: the files are still there
            log.debug("pod %s/%s: no kwok Logs object (%s)", run.namespace, run.name, e.status)

    def _pump(self, run: PodRun) -> None:
        with run.proc.stdout as pipe:  # until every process of the container closed its output
            while chunk := pipe.read1(65536):
                _write_output(run, chunk)
        _flush_partial_line(run)

    def _reap(self, run: PodRun) -> None:
        pump = threading.Thread(target=self._pump, args=(run,), name=f"output-{run.name}", daemon=True)
        pump.start()
        rc = run.proc.wait()
        pump.join(timeout=2)  # the output written before the exit; a leftover child may hold the pipe longer
        run.exit_code = 128 - rc if rc < 0 else rc
        self._events.put(("exited", run))
        if self._stop.is_set():
            self._mark_exited(run)

    def _finish(self, run: PodRun) -> None:
        """The container's main process exited: end the container, report the exit code."""
        if self._group_alive(run):
            run.signal(signal.SIGKILL, record=False)  # the rest of the container goes with it
        with self._lock:
            if self._active.get((run.namespace, run.name)) is run:
                del self._active[(run.namespace, run.name)]
        self._mark_exited(run)
        from kubernetes.client.rest import ApiException

        ok = run.exit_code == 0
        ann = {OUTCOME_KEY: "Succeeded" if ok else "Failed"}
        if not ok:
            ann[EXIT_CODE_KEY] = str(run.exit_code)
        try:  # the uid makes it a precondition: never annotate a recreated pod of the same name
            self._core.patch_namespaced_pod(run.name, run.namespace,
                                            {"metadata": {"uid": run.uid, "annotations": ann}})
        except ApiException as e:
            if e.status not in (404, 409, 422):
                raise
        log.info("pod %s/%s: pid %s exited %s", run.namespace, run.name, run.pid, run.exit_code)

    @staticmethod
    def _mark_exited(run: PodRun) -> None:
        if run.exited_at is None:
            run.exited_at = time.time()
        if run.exit_code is None and run.proc is not None and run.proc.returncode is not None:
            rc = run.proc.returncode
            run.exit_code = 128 - rc if rc < 0 else rc
        run.exited.set()

    @staticmethod
    def _group_alive(run: PodRun) -> bool:
        if run.proc is None:
            return False
        try:
            os.killpg(run.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    # -- what the container sees ------------------------------------------------------

    def _prepare_volumes(self, pod: dict, container: dict, run: PodRun) -> dict[str, Path]:
        ns = pod["metadata"]["namespace"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        dirs: dict[str, Path] = {}
        for name, vol in volumes.items():
            if "persistentVolumeClaim" in vol:  # outlives the pod, shared like a real claim
                d = self.workdir / ns / "_pvc" / vol["persistentVolumeClaim"]["claimName"]
            else:
                d = run.dir / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            for key, data in self._projected_files(ns, vol).items():
                (d / key).parent.mkdir(parents=True, exist_ok=True)
                (d / key).write_bytes(data)
            dirs[name] = d
        mounts: dict[str, Path] = {}
        for m in container.get("volumeMounts") or []:
            path = m["mountPath"].rstrip("/")
            if not path or m["name"] not in dirs:
                continue
            local = dirs[m["name"]] / m.get("subPath", "")
            local.mkdir(parents=True, exist_ok=True)
            mounts[path] = local
        return mounts

    def _projected_files(self, ns: str, vol: dict) -> dict[str, bytes]:
        if "configMap" in vol:
            src, optional = vol["configMap"], vol["configMap"].get("optional", False)
            data = self._config_map(ns, src["name"], optional)
        elif "secret" in vol:
            src, optional = vol["secret"], vol["secret"].get("optional", False)
            data = self._secret(ns, src["secretName"], optional)
        else:
            return {}
        if src.get("items"):
            return {it["path"]: data[it["key"]].encode() for it in src["items"] if it["key"] in data}
        return {k: v.encode() for k, v in data.items()}

    def _container_env(self, pod: dict, container: dict, mounts: dict[str, Path]) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}

        def put(name: str, value: str) -> None:
            if name in MASTER_ADDR_VARS:
                value = "127.0.0.1"
            elif name in MASTER_PORT_VARS and self._job_key(pod):
                value = str(self._job_port(pod))
            env[name] = map_paths(value, mounts)

        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                data = self._config_map(ns, ref["name"], ref.get("optional", False))
            else:
                ref = src["secretRef"]
                data = self._secret(ns, ref["name"], ref.get("optional", False))
            for k, v in data.items():
                put(prefix + k, v)
        for var in container.get("env") or []:
            name, vf = var["name"], var.get("valueFrom")
            if vf is None:
                put(name, expand(var.get("value") or "", env.get))
            elif "fieldRef" in vf:
                put(name, _field_value(pod, vf["fieldRef"]["fieldPath"]))
            elif "resourceFieldRef" in vf:
                put(name, _resource_value(container, vf["resourceFieldRef"]))
            elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                is_cm = "configMapKeyRef" in vf
                ref = vf["configMapKeyRef" if is_cm else "secretKeyRef"]
                optional = ref.get("optional", False)
                data = (self._config_map if is_cm else self._secret)(ns, ref["name"], optional)
                if ref["key"] in data:
                    put(name, data[ref["key"]])
                elif not optional:
                    raise ConfigError(f"couldn't find key {ref['key']} in "
                                      f"{'ConfigMap' if is_cm else 'Secret'} {ns}/{ref['name']}")
        return env

    def _config_map(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        obj = self._read(self._core.read_namespaced_config_map, ns, name, optional, "configmap")
        if obj is None:
            return {}
        data = dict(obj.data or {})
        data.update({k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.binary_data or {}).items()})
        return data

    def _secret(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        obj = self._read(self._core.read_namespaced_secret, ns, name, optional, "secret")
        if obj is None:
            return {}
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.data or {}).items()}

    @staticmethod
    def _read(fn, ns: str, name: str, optional: bool, kind: str) -> Any:
        from kubernetes.client.rest import ApiException

        try:
            return fn(name, ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            if e.status == 404:
                raise ConfigError(f'{kind} "{name}" not found') from None
            raise

    @staticmethod
    def _job_key(pod: dict) -> tuple | None:
        meta = pod["metadata"]
        job = (meta.get("labels") or {}).get(JOB_NAME_LABEL)
        if not job:
            return None
        owner = next((o["uid"] for o in meta.get("ownerReferences") or []
                      if o.get("controller") and o.get("name") == job), "")
        return (meta["namespace"], job, owner)

    def _job_port(self, pod: dict) -> int:
        key = self._job_key(pod)
        with self._lock:
            if key not in self._ports:
                taken = set(self._ports.values())
                port = free_port()
                while port in taken:
                    port = free_port()
                self._ports[key] = port
            return self._ports[key]

    def _pods_summary(self, namespace: str) -> str:
        with self._lock:
            pods = [p for p in self._pods.values() if p["metadata"]["namespace"] == namespace]
        return "pods seen: " + (", ".join(
            f"{p['metadata']['name']} ({p.get('status', {}).get('phase')}, node {p['spec'].get('nodeName')})"
            for p in pods) or "none")
