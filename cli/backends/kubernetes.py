"""A Kubernetes cluster: each experiment is an `Experiment` custom resource that the dlmctl operator runs.

The contract with the operator (operator/):
    submit   creates the Experiment (the user's spec; `.status` belongs to the operator), which makes one
             PyTorchJob per run owned by it; `--replace` deletes the old one first (propagation Foreground:
             its jobs go with it) and waits until it is gone;
    cancel   sets the annotation ANNOTATION_CANCEL (an RFC 3339 time); the operator suspends the jobs and
             marks the unfinished runs Cancelled; checkpoints are never deleted;
    get      the object with the `.status` the operator wrote (ExperimentStatus); none yet: every run Pending.
`logs` reads the master pod of each run's job; `compare` and `artifacts` read each run's store
(`<checkpoint.uri>/<run>/`) with the credentials of this machine's environment.

The `kubernetes` client is imported here only, when a command uses this backend. Every failure the user
can act on (no kubeconfig, unknown context, unreachable server, missing CRD, forbidden, not found) is
one line through UserError.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from dlmctl.spec import GROUP, PLURAL, VERSION

from ..errors import NotFound, UserError, one_line
from .base import Backend, Comparison, ExperimentSummary
from .local_state import home

if TYPE_CHECKING:
    from dlmctl.spec import Experiment, Run, RunStatus
    from dlmctl.spec.contracts import RunProgress

REQUEST_TIMEOUT = (5, 30)  # seconds to connect, to read one answer
REPLACE_TIMEOUT = 180.0  # how long `--replace` waits for the old experiment (and its jobs) to go
POLL_SECONDS = 1.0
FOLLOW_POLL_SECONDS = 2.0
LOG_DRAIN_SECONDS = 3.0  # a followed log still open this long after its pod ended is closed
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"  # set by the training-operator on each pod
RESOURCE = "experiments.dlmctl.io"
INSTALL_CRD = "kubectl apply -f charts/dlmctl/crds/"
STORE_FILES = ("tokenizer.json", "metrics.jsonl")  # what sample/export read besides run.json and the checkpoints


class ClusterApiError(UserError):
    """The API server refused a request; `status` is its HTTP status (0: not reached)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class KubernetesBackend(Backend):
    name = "kubernetes"
    namespaced = True

    def __init__(self, context: Optional[str] = None, namespace: Optional[str] = None,
                 default_namespace: Optional[str] = None):
        """`namespace` is the one asked for (-n); `default_namespace` (a dlmctl context's) comes before the
        kubeconfig context's."""
        from kubernetes import client

        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retry warnings are not ours
        configuration, self.kubeconfig, self.context, context_namespace = _load_configuration(context)
        configuration.retries = 1
        self.server = configuration.host
        self.explicit_namespace = namespace
        self.namespace = namespace or default_namespace or context_namespace or "default"
        self._api = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(self._api)
        self.core = client.CoreV1Api(self._api)

    def where(self, experiment: Optional["Experiment"] = None) -> str:
        namespace = self._namespace_for(experiment) if experiment is not None else self.namespace
        return f"the kubernetes backend: context {self.context}, namespace {namespace} ({self.server})"

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, experiment: "Experiment", replace: bool = False, fresh: bool = False) -> list[str]:
        from dlmctl.operator.jobs import check_cluster_ready
        from dlmctl.spec import SpecError

        if fresh:
            raise UserError("--fresh: the kubernetes backend cannot start runs over yet (they resume from the "
                            "checkpoints under spec.checkpoint.uri); choose a new checkpoint URI or experiment name")
        try:
            check_cluster_ready(experiment)  # before the cluster is touched: nothing is created on error
        except SpecError as err:
            raise SpecError(f"{err} (or run it on this machine with --backend local)") from None
        name, namespace = experiment.metadata.name, self._namespace_for(experiment)
        body = experiment.model_dump(mode="json", exclude_none=True, exclude={"status"})
        body["metadata"]["namespace"] = namespace
        if replace:
            self._delete_and_wait(name, namespace)
        try:
            self._call("create", self.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                       body, namespace=namespace, name=name)
        except ClusterApiError as err:
            if err.status != 409:
                raise
            phase = self._phase_of(name, namespace)
            raise UserError(
                f"metadata.name: experiment {name!r} already exists in namespace {namespace!r} ({phase}); "
                "pass --replace to replace it, or choose another name"
            ) from None
        return [run.name for run in experiment.runs()]

    def _namespace_for(self, experiment: "Experiment") -> str:
        """The spec's metadata.namespace if it has one (as `kubectl create` does), else this backend's."""
        own = experiment.metadata.namespace
        if own and self.explicit_namespace and own != self.explicit_namespace:
            raise UserError(f"metadata.namespace: the spec says {own!r} but --namespace says "
                            f"{self.explicit_namespace!r}; drop one of them")
        return own or self.namespace

    def _phase_of(self, name: str, namespace: str) -> str:
        try:
            obj = self._read(name, namespace)
        except UserError:
            return "unknown phase"
        if obj["metadata"].get("deletionTimestamp"):
            return "being deleted"
        return (obj.get("status") or {}).get("phase") or "Pending"

    def _delete_and_wait(self, name: str, namespace: str) -> None:
        try:
            old = self._read(name, namespace)
        except NotFound:
            return
        try:
            self._call("delete", self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                       name, propagation_policy="Foreground", namespace=namespace, name=name)
        except NotFound:
            return
        uid, deadline = old["metadata"].get("uid"), time.monotonic() + REPLACE_TIMEOUT
        while True:
            try:
                if self._read(name, namespace)["metadata"].get("uid") != uid:
                    return
            except NotFound:
                return
            if time.monotonic() > deadline:
                raise UserError(
                    f"experiment {name!r} in namespace {namespace!r} is still being deleted after "
                    f"{REPLACE_TIMEOUT:.0f}s (its PyTorchJobs go first); try --replace again later"
                )
            time.sleep(POLL_SECONDS)

    # -- list / get -----------------------------------------------------------------------------
    def list(self, all_namespaces: bool = False) -> list[ExperimentSummary]:
        if all_namespaces:
            answer = self._call("list", self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                                namespace=None)
        else:
            answer = self._call("list", self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                PLURAL, namespace=self.namespace)
        summaries = [self._summary(obj) for obj in answer.get("items", [])]
        return sorted(summaries, key=lambda s: (s.created is None, s.created or 0, s.namespace or "", s.name))

    def _summary(self, obj: dict) -> ExperimentSummary:
        meta, status = obj.get("metadata", {}), obj.get("status") or {}
        runs = status.get("runs") or []
        count = len(runs)
        if not count:
            try:
                count = len(self._experiment(obj).status.runs)
            except (UserError, ValueError):  # an Invalid spec: the operator's status says why
                count = 0
        created = meta.get("creationTimestamp")
        return ExperimentSummary(
            name=meta.get("name", "?"), phase=status.get("phase") or "Pending", runs=count,
            succeeded=sum(r.get("phase") == "Succeeded" for r in runs),
            created=datetime.fromisoformat(created.replace("Z", "+00:00")) if created else None,
            namespace=meta.get("namespace"),
        )

    def get(self, name: str) -> "Experiment":
        return self._experiment(self._read(name, self.namespace))

    def _read(self, name: str, namespace: str) -> dict:
        return self._call("get", self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                          namespace=namespace, name=name)

    def _experiment(self, obj: dict) -> "Experiment":
        """The Experiment with a status that has one entry per run, in the spec's order (Pending where the
        operator has written nothing yet)."""
        from dlmctl.spec import ExperimentStatus, RunStatus, SpecError, experiment_from_dict

        meta = obj.get("metadata", {})
        name, namespace = meta.get("name"), meta.get("namespace")
        try:  # spec.Metadata drops what the server set (uid, resourceVersion, managedFields, ...)
            experiment = experiment_from_dict(obj, f"experiment {name} in namespace {namespace}")
        except SpecError as err:
            status = obj.get("status") or {}
            if status.get("phase") == "Invalid":
                why = next((c.get("message") for c in status.get("conditions", []) if c.get("message")), None)
                raise UserError(f"experiment {name!r} in namespace {namespace!r} is Invalid: {why or err}") from None
            raise
        runs = experiment.runs()
        status = experiment.status or ExperimentStatus()
        written = {r.name: r for r in status.runs}
        filled = [written.get(run.name) or RunStatus(name=run.name, arm=run.arm) for run in runs]
        succeeded = sum(r.phase == "Succeeded" for r in filled)
        return experiment.model_copy(update={"status": status.model_copy(
            update={"runs": filled, "progress": status.progress or f"{succeeded}/{len(filled)}"})})

    # -- logs -----------------------------------------------------------------------------------
    def logs(self, name: str, run: Optional[str] = None, follow: bool = False) -> Iterator[str]:
        experiment = self.get(name)
        runs = [r.name for r in experiment.status.runs]
        if run is not None and run not in runs:
            raise NotFound(f"--run: experiment {name!r} has no run {run!r} (its runs: {', '.join(runs)})")
        selected = [run] if run else runs
        prefix = (lambda r: f"[{r}] ") if len(selected) > 1 else (lambda r: "")
        if not follow:
            phases = {r.name: r for r in experiment.status.runs}
            for r in selected:
                pod = self._master_pod(r)
                if pod is None:
                    _note(f"{r}: {'no pod left' if _terminal(phases[r].phase) else 'no pod yet'} "
                          f"({_phase_words(phases[r])})")
                    continue
                if not _started(pod):
                    _note(f"{r}: pod {pod.metadata.name} has not started yet ({_waiting_reason(pod)})")
                    continue
                try:
                    for line in _lines(self._open_log(pod, follow=False)):
                        yield prefix(r) + line
                except ClusterApiError as err:
                    if err.status != 400:  # 400: the kubelet has no log for it (yet)
                        raise
                    _note(f"{r}: {err}")
            return
        yield from _merged([
            lambda emit, stop, r=r: self._follow_run(name, r, lambda line: emit(prefix(r) + line), stop)
            for r in selected
        ])

    def _follow_run(self, name: str, run: str, emit: Callable[[str], None], stop: threading.Event) -> None:
        """Stream the run's master pod; a recreated run (new pod) is followed on; ends when the run has."""
        streamed: set[str] = set()
        said_waiting, unreadable = False, None
        while not stop.is_set():
            pod = self._master_pod(run)
            if pod is not None and pod.metadata.uid not in streamed and _started(pod):
                try:
                    response = self._open_log(pod, follow=True)
                except ClusterApiError as err:
                    if err.status != 400:  # 400: the kubelet has no log for it yet; try again
                        raise
                    unreadable = err
                else:
                    streamed.add(pod.metadata.uid)
                    streaming = threading.Event()
                    streaming.set()
                    threading.Thread(target=self._end_stream_when_over, args=(pod, response, streaming, stop),
                                     daemon=True).start()
                    try:
                        for line in _lines(response):
                            emit(line)
                    finally:
                        streaming.clear()
                    continue
            status = next(r for r in self.get(name).status.runs if r.name == run)
            if _terminal(status.phase):
                if not streamed:
                    _note(f"{run}: {_phase_words(status)}; "
                          + (f"its pod's log cannot be read: {unreadable}" if unreadable else "it left no pod to show"))
                return
            if not said_waiting and not streamed and (pod is None or not _started(pod)):
                what = "no pod yet" if pod is None else f"pod {pod.metadata.name} not started ({_waiting_reason(pod)})"
                _note(f"{run}: {what}; waiting ({_phase_words(status)})")
                said_waiting = True
            stop.wait(FOLLOW_POLL_SECONDS)

    def _master_pod(self, run: str):
        from dlmctl.operator.jobs import LABEL_RUN

        pods = self._call("list", self.core.list_namespaced_pod, self.namespace,
                          label_selector=f"{LABEL_RUN}={run}", resource="pods", namespace=self.namespace).items
        pods = [p for p in pods if not p.metadata.deletion_timestamp] or pods
        masters = [p for p in pods if (p.metadata.labels or {}).get(REPLICA_TYPE_LABEL) == "master"] or pods
        return max(masters, key=lambda p: p.metadata.creation_timestamp, default=None)

    def _open_log(self, pod, follow: bool):
        """The log of the pod's trainer container as an open response (read it with `_lines`)."""
        from dlmctl.operator.jobs import CONTAINER

        container = CONTAINER if any(c.name == CONTAINER for c in pod.spec.containers) else None
        return self._call("read the log of", self.core.read_namespaced_pod_log, pod.metadata.name, self.namespace,
                          container=container, follow=follow, _preload_content=False,
                          timeout=(REQUEST_TIMEOUT[0], None), resource="pods", namespace=self.namespace,
                          name=pod.metadata.name)

    def _end_stream_when_over(self, pod, response, streaming: threading.Event, stop: threading.Event) -> None:
        """A kubelet ends a followed log when the container ends; a lost node or a fake kubelet may not.
        Close the stream once the pod has been gone or finished for LOG_DRAIN_SECONDS, or on `stop`."""
        over_since = None
        while streaming.is_set() and not stop.wait(FOLLOW_POLL_SECONDS):
            try:
                current = self.core.read_namespaced_pod(pod.metadata.name, self.namespace,
                                                        _request_timeout=REQUEST_TIMEOUT)
                over = current.metadata.uid != pod.metadata.uid or _finished(current)
            except Exception as err:  # gone (404), or the API server is unreachable: keep waiting for it
                over = getattr(err, "status", None) == 404
            over_since = (over_since or time.monotonic()) if over else None
            if over_since and time.monotonic() - over_since >= LOG_DRAIN_SECONDS:
                break
        if streaming.is_set():
            (getattr(response, "shutdown", None) or response.close)()  # unblocks the reading thread

    # -- cancel ---------------------------------------------------------------------------------
    def cancel(self, name: str) -> None:
        from dlmctl.operator.jobs import ANNOTATION_CANCEL

        now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        patch = {"metadata": {"annotations": {ANNOTATION_CANCEL: now}}}
        self._call("patch", self.custom.patch_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name,
                   patch, namespace=self.namespace, name=name)

    # -- compare / artifacts --------------------------------------------------------------------
    def compare(self, name: str) -> "Comparison":
        """Each run's metrics from its store, which is fresher than what the operator last wrote; where the
        store cannot be read, that status (and one line on stderr saying so)."""
        from dlmctl.operator.progress import read_progress

        experiment = self.get(name)
        progress, failed = read_progress(experiment)
        if failed:
            uri, err = failed
            _note(f"warning: cannot read {uri} ({_describe(err)}); showing the progress the operator last recorded")
        statuses = [_with_progress(status, progress[status.name]) if status.name in progress else status
                    for status in experiment.status.runs]
        status = experiment.status.model_copy(update={"runs": statuses})
        return Comparison(experiment.model_copy(update={"status": status}),
                          {run: p.evals for run, p in progress.items()})

    def artifacts(self, run: str) -> str:
        """`$DLMCTL_HOME/clusters/<context>/<namespace>/<run>/` with run.json and, from the run's store,
        tokenizer.json and metrics.jsonl: what sample/export read; the checkpoints stay in the store."""
        from dlmctl.operator.progress import run_store_uri, s3_filesystem

        found = self._find_run(run)
        uri = found.spec.checkpoint.uri or ""
        if not uri.startswith("s3://"):
            raise UserError(f"run {run}: spec.checkpoint.uri is {uri or 'not set'}, not an s3:// URI; "
                            "its pods kept no checkpoints anywhere this machine can read")
        folder = home() / "clusters" / _path_safe(self.context) / self.namespace / run
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(found.model_dump_json(indent=1))
        store = run_store_uri(uri, run)
        try:
            fs = s3_filesystem(found.spec.checkpoint.endpoint_url)
            for file in STORE_FILES:
                target, partial = folder / file, folder / f".{file}.partial"
                try:
                    fs.get_file(f"{store}/{file}", str(partial))
                except FileNotFoundError:
                    target.unlink(missing_ok=True)
                    continue
                os.replace(partial, target)
        except Exception as err:
            raise UserError(f"run {run}: cannot read its store {store}/ ({_describe(err)})") from None
        if not (folder / "tokenizer.json").is_file():
            raise UserError(f"run {run}: its store {store}/ has no tokenizer.json yet (the run has not started "
                            "training, or its trainer does not upload it)")
        return str(folder)

    def _find_run(self, run: str) -> "Run":
        answer = self._call("list", self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                            PLURAL, namespace=self.namespace)
        for obj in answer.get("items", []):
            if not run.startswith(f"{obj['metadata']['name']}-"):  # run names are `<experiment>-<arm>...`
                continue
            try:
                experiment = self._experiment(obj)
            except (UserError, ValueError):
                continue
            for candidate in experiment.runs():
                if candidate.name == run:
                    return candidate
        raise NotFound(f"no run named {run!r} in namespace {self.namespace!r} (context {self.context}; "
                       "dlmctl get EXPERIMENT lists its runs)")

    # -- requests -------------------------------------------------------------------------------
    def _call(self, verb: str, method: Callable, *args, namespace: Optional[str], name: Optional[str] = None,
              resource: str = RESOURCE, timeout: Any = REQUEST_TIMEOUT, **kwargs) -> Any:
        """One API request; what goes wrong becomes one line naming what was asked and of whom."""
        from kubernetes.client.rest import ApiException

        try:
            return method(*args, _request_timeout=timeout, **kwargs)
        except ApiException as err:
            raise self._refused(err, verb, resource, namespace, name) from None
        except Exception as err:
            if _is_connection_error(err):
                raise ClusterApiError(f"cannot reach the Kubernetes API server {self.server} "
                                      f"(context {self.context}): {_describe(err)}") from None
            raise

    def _refused(self, err, verb: str, resource: str, namespace: Optional[str], name: Optional[str]) -> UserError:
        body = _json_body(err.body)
        message = one_line(body.get("message") or err.reason or "")
        where = f"in namespace {namespace!r}" if namespace else "in any namespace"
        what = "experiment" if resource == RESOURCE else resource.rstrip("s")
        if err.status == 404:
            if name and (body.get("details") or {}).get("name") == name:
                return NotFound(f"no {what} named {name!r} {where} (context {self.context}"
                                + ("; dlmctl list shows them)" if resource == RESOURCE else ")"))
            if resource == RESOURCE:
                return ClusterApiError(
                    f"the Experiment resource ({RESOURCE}/{VERSION}) is not installed in the cluster of context "
                    f"{self.context} ({self.server}); install it with `{INSTALL_CRD}` (or the dlmctl Helm chart)", 404)
        if err.status == 403:
            user = re.search(r'User "([^"]+)"', message)
            return ClusterApiError(
                f"permission denied: {user.group(1) if user else 'you'} may not {verb} {resource} {where} "
                f"(context {self.context}); ask a cluster admin for a Role that allows it", 403)
        if err.status == 401:
            return ClusterApiError(f"unauthorized: {self.server} rejected the credentials of context {self.context} "
                                   "(an expired token or certificate?)", 401)
        if err.status == 409:
            return ClusterApiError(f"{what} {name!r} {where} already exists", 409)
        target = f"{what} {name}" if name else resource
        if err.status in (400, 422):
            return ClusterApiError(f"the API server refused to {verb} {target} {where}: {message}", err.status)
        return ClusterApiError(f"cannot {verb} {target} {where}: the API server {self.server} answered "
                               f"{err.status} {err.reason}: {message}", err.status or 0)


# -- configuration ----------------------------------------------------------------------------------

def _load_configuration(context: Optional[str]):
    """(client configuration, kubeconfig path, context name, the context's namespace)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    # Read at call time: the client reads $KUBECONFIG once, when it is imported.
    paths = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    existing = [str(Path(p).expanduser()) for p in paths.split(os.pathsep) if p and Path(p).expanduser().is_file()]
    if not existing:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:  # inside a pod
            try:
                config.load_incluster_config(client_configuration=configuration)
            except Exception as err:
                raise UserError(f"in-cluster Kubernetes configuration: {one_line(err)}") from None
            namespace = IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.is_file() else None
            return configuration, None, "in-cluster", namespace
        raise UserError(f"no kubeconfig: {paths} does not exist; point KUBECONFIG at one "
                        "(or run on this machine with --backend local)")
    where = os.pathsep.join(existing)
    try:
        contexts, current = config.list_kube_config_contexts(config_file=where)
    except Exception as err:
        raise UserError(f"{where}: not a usable kubeconfig: {one_line(err)}") from None
    names = [c["name"] for c in contexts or []]
    if context is None:
        if not current:
            raise UserError(f"{where} has no current context; choose one with --context "
                            f"({', '.join(names) or 'it defines none'})")
        context = current["name"]
    if context not in names:
        raise UserError(f"--context: no context {context!r} in {where} (its contexts: {', '.join(names) or 'none'})")
    entry = next(c for c in contexts if c["name"] == context)
    try:
        config.load_kube_config(config_file=where, context=context, client_configuration=configuration,
                                persist_config=False)
    except Exception as err:
        raise UserError(f"kubeconfig context {context}: {one_line(err)}") from None
    return configuration, where, context, (entry.get("context") or {}).get("namespace")


# -- helpers ----------------------------------------------------------------------------------------

def _merged(workers: list[Callable[[Callable[[str], None], threading.Event], None]]) -> Iterator[str]:
    """Run each worker in a thread; yield what they emit as it comes; re-raise the first error. When the
    consumer stops (an error, ^C), the workers are told to stop at their next poll."""
    lines: queue.Queue = queue.Queue()
    stop, done = threading.Event(), object()

    def run(worker):
        try:
            worker(lines.put, stop)
        except BaseException as err:  # handed to the caller's thread
            lines.put(err)
        finally:
            lines.put(done)

    for worker in workers:
        threading.Thread(target=run, args=(worker,), daemon=True).start()
    running = len(workers)
    try:
        while running:
            item = lines.get()
            if item is done:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()


def _with_progress(status: "RunStatus", progress: "RunProgress") -> "RunStatus":
    from dlmctl.spec.experiment import status_progress

    return status.model_copy(update=status_progress(progress))


def _lines(response) -> Iterator[str]:
    """The lines of a streamed response as they arrive; ends quietly if the connection is cut."""
    pending = b""
    try:
        for chunk in response.stream(64 * 1024, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", errors="replace")
    except Exception as err:  # the pod went away mid-stream, the connection broke, it was shut down
        if not _is_connection_error(err) and not isinstance(err, ValueError):
            raise
    finally:
        response.release_conn()
    if pending:
        yield pending.decode("utf-8", errors="replace")


def _finished(pod) -> bool:
    return pod.status.phase in ("Succeeded", "Failed") or bool(pod.metadata.deletion_timestamp)


def _started(pod) -> bool:
    from dlmctl.operator.jobs import CONTAINER

    for c in pod.status.container_statuses or []:
        if c.name == CONTAINER or len(pod.spec.containers) == 1:
            return bool(c.state and (c.state.running or c.state.terminated))
    return pod.status.phase in ("Running", "Succeeded", "Failed")


def _waiting_reason(pod) -> str:
    for c in pod.status.container_statuses or []:
        if c.state and c.state.waiting and c.state.waiting.reason:
            return c.state.waiting.reason
    for c in pod.status.conditions or []:
        if c.type == "PodScheduled" and c.status != "True":
            return one_line(c.message or c.reason or "not scheduled")
    return pod.status.phase or "Pending"


def _phase_words(status: "RunStatus") -> str:
    words = f"run {status.phase}"
    if status.reason:
        words += f" ({status.reason})"
    if status.message:
        words += f": {one_line(status.message)}"
    return words


def _terminal(phase) -> bool:
    from dlmctl.spec.contracts import is_terminal

    return is_terminal(str(phase))


def _is_connection_error(err: BaseException) -> bool:
    import urllib3

    return isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError))


def _describe(err: BaseException) -> str:
    text = one_line(str(getattr(err, "reason", None) or err) or type(err).__name__)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("nodename nor servname", "unknown host"),
                          ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted"),
                          ("No route to host", "no route to host"), ("Connection reset", "connection reset")):
        if needle in text:
            return short
    if isinstance(err, ModuleNotFoundError):
        return f"{err.name} is not installed; pip install 'dlmctl[train]'"
    return text[:300]


def _json_body(body: Any) -> dict:
    try:
        parsed = json.loads(body) if body else {}
    except (TypeError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _path_safe(name: str) -> str:
    """A context name as one folder name (EKS contexts look like arn:aws:eks:…:cluster/name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "context"
