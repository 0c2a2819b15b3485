"""The Experiment client: create, read, list, delete and cancel `Experiment` objects, read a run's master-pod
log and its progress, through a kubernetes `ApiClient` -- the CLI's kubernetes backend and the API service
(whose client impersonates its caller) both act through it.

Failures are `ClientError`s carrying what was asked (verb, resource, namespace, name) and the API server's
answer; the CLI words them for a terminal, the service turns them into HTTP statuses. The `kubernetes`
package is imported when a client is made, never by importing this module.
"""
from __future__ import annotations

import functools
import json
import queue
import re
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from dlmctl.spec import GROUP, PLURAL, VERSION
from dlmctl.spec.redact import redact_text

if TYPE_CHECKING:
    from dlmctl.spec import Experiment, Run, RunStatus
    from dlmctl.spec.contracts import EvalEvent, RunProgress

REQUEST_TIMEOUT = (5, 30)  # seconds to connect, to read one answer
REPLACE_TIMEOUT = 180.0  # how long a replace waits for the old experiment (and its jobs) to go
POLL_SECONDS = 1.0
FOLLOW_POLL_SECONDS = 2.0
LOG_DRAIN_SECONDS = 3.0  # a followed log still open this long after its pod ended is closed
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"  # set by the training-operator on each pod
RESOURCE = f"{PLURAL}.{GROUP}"


# -- errors -------------------------------------------------------------------------------------------

class ClientError(Exception):
    """The API server refused a request (or was not reached: status 0). `message` is the server's own
    explanation on one line, secrets masked."""
    status = 0

    def __init__(self, message: str = "", *, verb: str = "", resource: str = RESOURCE,
                 namespace: Optional[str] = None, name: Optional[str] = None, status: Optional[int] = None,
                 reason: str = ""):
        super().__init__(message)
        self.message, self.verb, self.resource, self.namespace, self.name = message, verb, resource, namespace, name
        self.reason = reason
        if status is not None:
            self.status = status

    @property
    def user(self) -> Optional[str]:
        """Who the API server says asked (403 answers name them)."""
        found = re.search(r'User "([^"]+)"', self.message)
        return found.group(1) if found else None


class Unreachable(ClientError):
    """The API server did not answer (connection refused, timed out, TLS)."""


class NotFound(ClientError):
    status = 404


class NotInstalled(ClientError):
    """The resource's kind is unknown to the API server (the CRD is not installed)."""
    status = 404


class Unauthorized(ClientError):
    status = 401


class Forbidden(ClientError):
    status = 403


class Conflict(ClientError):
    status = 409


class StillDeleting(Conflict):
    """A replace found the old experiment still being deleted after REPLACE_TIMEOUT."""


class Invalid(ClientError):
    """The API server refused the object (400/422: its schema or validation rules)."""
    status = 422


class InvalidExperiment(ClientError):
    """A stored object that is no valid Experiment (the operator marks it Invalid); `message` says why."""
    status = 409


# -- the client ---------------------------------------------------------------------------------------

class ExperimentClient:
    def __init__(self, api):
        from kubernetes import client

        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    # -- requests ---------------------------------------------------------------------------------------
    def call(self, verb: str, method: Callable, *args, namespace: Optional[str], name: Optional[str] = None,
             resource: str = RESOURCE, timeout: Any = REQUEST_TIMEOUT, **kwargs) -> Any:
        """One API request; a refusal becomes the ClientError that says what was asked."""
        from kubernetes.client.rest import ApiException

        try:
            return method(*args, _request_timeout=timeout, **kwargs)
        except ApiException as err:
            raise refusal(err, verb, resource, namespace, name) from None
        except Exception as err:
            if is_connection_error(err):
                raise Unreachable(describe(err), verb=verb, resource=resource, namespace=namespace,
                                  name=name) from None
            raise

    # -- experiments ------------------------------------------------------------------------------------
    def create(self, experiment: "Experiment", namespace: str) -> dict:
        """The user's spec as a new object in `namespace` (`.status` belongs to the operator)."""
        body = experiment.model_dump(mode="json", exclude_none=True, exclude={"status"})
        body["metadata"]["namespace"] = namespace
        name = experiment.metadata.name
        return self.call("create", self.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                         body, namespace=namespace, name=name)

    def check_queues(self, experiment: "Experiment", namespace: str) -> None:
        """SpecError naming spec.scheduling.queue when a run's Kueue LocalQueue is not there (or Kueue is not):
        asked before anything is created or replaced."""
        from . import kueue

        self.call("get", lambda **_: kueue.check_queues(self.custom, experiment, namespace), namespace=namespace,
                  resource=f"{kueue.LOCAL_QUEUES}.{kueue.GROUP}")

    def read(self, name: str, namespace: str) -> dict:
        return self.call("get", self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                         namespace=namespace, name=name)

    def get(self, name: str, namespace: str) -> "Experiment":
        return experiment_with_runs(self.read(name, namespace))

    def list(self, namespace: Optional[str]) -> list[dict]:
        """The objects in `namespace` (None: every namespace)."""
        if namespace is None:
            answer = self.call("list", self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, namespace=None)
        else:
            answer = self.call("list", self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                               namespace=namespace)
        return answer.get("items", [])

    def summaries(self, namespace: Optional[str]) -> list[dict[str, Any]]:
        """`summary` of each experiment, oldest first."""
        found = [summary(obj) for obj in self.list(namespace)]
        return sorted(found, key=lambda s: (s["created"] is None, s["created"] or 0, s["namespace"] or "", s["name"]))

    def phase_of(self, name: str, namespace: str) -> str:
        try:
            obj = self.read(name, namespace)
        except ClientError:
            return "unknown phase"
        if obj["metadata"].get("deletionTimestamp"):
            return "being deleted"
        return (obj.get("status") or {}).get("phase") or "Pending"

    def delete(self, name: str, namespace: str) -> None:
        """Propagation Foreground: the experiment's PyTorchJobs go with it."""
        self.call("delete", self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                  propagation_policy="Foreground", namespace=namespace, name=name)

    def delete_and_wait(self, name: str, namespace: str, timeout: float = REPLACE_TIMEOUT) -> None:
        """Delete the experiment if there is one and wait until it (and its jobs) are gone."""
        try:
            old = self.read(name, namespace)
        except NotFound:
            return
        try:
            self.delete(name, namespace)
        except NotFound:
            return
        uid, deadline = old["metadata"].get("uid"), time.monotonic() + timeout
        while True:
            try:
                if self.read(name, namespace)["metadata"].get("uid") != uid:
                    return
            except NotFound:
                return
            if time.monotonic() > deadline:
                raise StillDeleting(f"still being deleted after {timeout:.0f}s (its PyTorchJobs go first)",
                                    verb="replace", namespace=namespace, name=name)
            time.sleep(POLL_SECONDS)

    def cancel(self, name: str, namespace: str) -> None:
        """Ask the operator to stop the unfinished runs: the annotation ANNOTATION_CANCEL (an RFC 3339 time)."""
        from .jobs import ANNOTATION_CANCEL

        now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        patch = {"metadata": {"annotations": {ANNOTATION_CANCEL: now}}}
        self.call("patch", self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                  patch, namespace=namespace, name=name)

    def compare(self, name: str, namespace: str
                ) -> tuple["Experiment", dict[str, list["EvalEvent"]], Optional[tuple[str, Exception]]]:
        """The experiment with each run's metrics from its store (fresher than what the operator last wrote),
        each run's evaluations, and the (uri, error) of a store that could not be read (its runs keep their
        status)."""
        from .progress import read_progress

        experiment = self.get(name, namespace)
        progress, failed = read_progress(experiment)
        statuses = [with_progress(s, progress[s.name]) if s.name in progress else s for s in experiment.status.runs]
        status = experiment.status.model_copy(update={"runs": statuses})
        return (experiment.model_copy(update={"status": status}), {run: p.evals for run, p in progress.items()},
                failed)

    def find_run(self, run: str, namespace: str) -> Optional["Run"]:
        """The run named `run` among the experiments of `namespace`, or None."""
        for obj in self.list(namespace):
            if not run.startswith(f"{obj['metadata']['name']}-"):  # run names are `<experiment>-<arm>...`
                continue
            try:
                experiment = experiment_with_runs(obj)
            except (ClientError, ValueError):
                continue
            for candidate in experiment.runs():
                if candidate.name == run:
                    return candidate
        return None

    # -- logs -------------------------------------------------------------------------------------------
    def master_pod(self, run: str, namespace: str):
        from .jobs import LABEL_RUN

        pods = self.call("list", self.core.list_namespaced_pod, namespace, label_selector=f"{LABEL_RUN}={run}",
                         resource="pods", namespace=namespace).items
        pods = [p for p in pods if not p.metadata.deletion_timestamp] or pods
        masters = [p for p in pods if (p.metadata.labels or {}).get(REPLICA_TYPE_LABEL) == "master"] or pods
        return max(masters, key=lambda p: p.metadata.creation_timestamp, default=None)

    def open_log(self, pod, namespace: str, follow: bool):
        """The log of the pod's trainer container as an open response (read it with `lines`)."""
        from .jobs import CONTAINER

        container = CONTAINER if any(c.name == CONTAINER for c in pod.spec.containers) else None
        return self.call("read the log of", self.core.read_namespaced_pod_log, pod.metadata.name, namespace,
                         container=container, follow=follow, _preload_content=False,
                         timeout=(REQUEST_TIMEOUT[0], None), resource="pods", namespace=namespace,
                         name=pod.metadata.name)

    def follow_run(self, name: str, run: str, namespace: str, emit: Callable[[str], None], stop: threading.Event,
                   note: Callable[[str], None], words: Callable[[ClientError], str] = str) -> None:
        """Stream the run's master pod log line by line to `emit`; a recreated run (new pod) is followed on;
        ends when the run has (or `stop` is set). `note` hears what there is to say besides the log (a refusal
        to read it in `words`)."""
        streamed: set[str] = set()
        said_waiting, unreadable = False, None
        while not stop.is_set():
            pod = self.master_pod(run, namespace)
            if pod is not None and pod.metadata.uid not in streamed and started(pod):
                try:
                    response = self.open_log(pod, namespace, follow=True)
                except ClientError as err:
                    if err.status != 400:  # 400: the kubelet has no log for it yet; try again
                        raise
                    unreadable = err
                else:
                    streamed.add(pod.metadata.uid)
                    streaming = threading.Event()
                    streaming.set()
                    threading.Thread(target=self._end_stream_when_over,
                                     args=(pod, namespace, response, streaming, stop), daemon=True).start()
                    try:
                        for line in lines(response):
                            emit(line)
                    finally:
                        streaming.clear()
                    continue
            status = next(r for r in self.get(name, namespace).status.runs if r.name == run)
            if terminal(status.phase):
                if not streamed:
                    left = f"its pod's log cannot be read: {words(unreadable)}" if unreadable else None
                    note(f"{run}: {phase_words(status)}; {left or 'it left no pod to show'}")
                return
            if not said_waiting and not streamed and (pod is None or not started(pod)):
                what = "no pod yet" if pod is None else f"pod {pod.metadata.name} not started ({waiting_reason(pod)})"
                note(f"{run}: {what}; waiting ({phase_words(status)})")
                said_waiting = True
            stop.wait(FOLLOW_POLL_SECONDS)

    def _end_stream_when_over(self, pod, namespace: str, response, streaming: threading.Event,
                              stop: threading.Event) -> None:
        """A kubelet ends a followed log when the container ends; a lost node or a fake kubelet may not.
        Close the stream once the pod has been gone or finished for LOG_DRAIN_SECONDS, or on `stop`."""
        over_since = None
        while streaming.is_set() and not stop.wait(FOLLOW_POLL_SECONDS):
            try:
                current = self.core.read_namespaced_pod(pod.metadata.name, namespace, _request_timeout=REQUEST_TIMEOUT)
                over = current.metadata.uid != pod.metadata.uid or finished(current)
            except Exception as err:  # gone (404), or the API server is unreachable: keep waiting for it
                over = getattr(err, "status", None) == 404
            over_since = (over_since or time.monotonic()) if over else None
            if over_since and time.monotonic() - over_since >= LOG_DRAIN_SECONDS:
                break
        if streaming.is_set():
            (getattr(response, "shutdown", None) or response.close)()  # unblocks the reading thread


# -- objects ------------------------------------------------------------------------------------------

def experiment_with_runs(obj: dict) -> "Experiment":
    """An Experiment object as the API server returns it, with a status that has one entry per run, in the
    spec's order (Pending where the operator has written nothing yet). An object the operator marked Invalid
    raises InvalidExperiment with its reason; another invalid one, SpecError."""
    from dlmctl.spec import ExperimentStatus, RunStatus, SpecError, experiment_from_dict

    meta = obj.get("metadata", {})
    name, namespace = meta.get("name"), meta.get("namespace")
    try:  # spec.Metadata drops what the server set (uid, resourceVersion, managedFields, ...)
        experiment = experiment_from_dict(obj, f"experiment {name} in namespace {namespace}")
    except SpecError as err:
        status = obj.get("status") or {}
        if status.get("phase") == "Invalid":
            why = next((c.get("message") for c in status.get("conditions", []) if c.get("message")), None)
            raise InvalidExperiment(f"experiment {name!r} in namespace {namespace!r} is Invalid: {why or err}",
                                    verb="get", namespace=namespace, name=name) from None
        raise
    runs = experiment.runs()
    status = experiment.status or ExperimentStatus()
    written = {r.name: r for r in status.runs}
    filled = [written.get(run.name) or RunStatus(name=run.name, arm=run.arm) for run in runs]
    succeeded = sum(r.phase == "Succeeded" for r in filled)
    return experiment.model_copy(update={"status": status.model_copy(
        update={"runs": filled, "progress": status.progress or f"{succeeded}/{len(filled)}"})})


def summary(obj: dict) -> dict[str, Any]:
    """name, namespace, phase, runs, succeeded and created (a datetime, or None) of an Experiment object."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    runs = status.get("runs") or []
    count = len(runs) or _spec_run_count(obj)
    created = meta.get("creationTimestamp")
    return {"name": meta.get("name", "?"), "namespace": meta.get("namespace"),
            "phase": status.get("phase") or "Pending", "runs": count,
            "succeeded": sum(r.get("phase") == "Succeeded" for r in runs),
            "created": datetime.fromisoformat(created.replace("Z", "+00:00")) if created else None}


def per_object_version(maxsize: int):
    """Keep a function of a stored object's dict per object version (uid and resourceVersion: any change to the
    object is a new version). An object without both is computed afresh; a call that raises is not kept; a full
    cache starts over. Callers must not mutate what a kept call returns."""
    def decorate(compute: Callable[[dict], Any]) -> Callable[[dict], Any]:
        kept: dict[tuple[str, str], Any] = {}
        lock = threading.Lock()

        @functools.wraps(compute)
        def cached(obj: dict) -> Any:
            meta = obj.get("metadata", {})
            key = (meta.get("uid"), meta.get("resourceVersion"))
            if None in key:
                return compute(obj)
            if key in kept:
                return kept[key]
            value = compute(obj)
            with lock:
                if len(kept) >= maxsize:
                    kept.clear()
                kept[key] = value
            return value
        return cached
    return decorate


@per_object_version(maxsize=4096)
def _spec_run_count(obj: dict) -> int:
    """How many runs the object's spec makes (0 for an invalid spec: the operator's status says why). Validating
    a spec costs milliseconds and a list may hold hundreds, hence kept per object version."""
    try:
        return len(experiment_with_runs(obj).status.runs)
    except (ClientError, ValueError):
        return 0


def refusal(err, verb: str, resource: str, namespace: Optional[str], name: Optional[str]) -> ClientError:
    """The ClientError for an ApiException."""
    body = json_body(err.body)
    message = redact_text(" ".join(str(body.get("message") or err.reason or "").split()))
    kind = {401: Unauthorized, 403: Forbidden, 409: Conflict, 400: Invalid, 422: Invalid}.get(err.status, ClientError)
    if err.status == 404:
        named = name and (body.get("details") or {}).get("name") == name
        kind = NotFound if named or resource != RESOURCE else NotInstalled
    return kind(message, verb=verb, resource=resource, namespace=namespace, name=name, status=err.status or 0,
                reason=str(err.reason or ""))


# -- helpers ------------------------------------------------------------------------------------------

def merged(workers: list[Callable[[Callable[[str], None], threading.Event], None]],
           stop: Optional[threading.Event] = None) -> Iterator[str]:
    """Run each worker in a thread; yield what they emit as it comes; re-raise the first error. When the
    consumer stops (an error, ^C, a closed connection) or `stop` is set, the workers stop at their next poll."""
    items: queue.Queue = queue.Queue()
    stop, done = stop or threading.Event(), object()

    def run(worker):
        try:
            worker(items.put, stop)
        except BaseException as err:  # handed to the caller's thread
            items.put(err)
        finally:
            items.put(done)

    for worker in workers:
        threading.Thread(target=run, args=(worker,), daemon=True).start()
    running = len(workers)
    try:
        while running:
            item = items.get()
            if item is done:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()


def with_progress(status: "RunStatus", progress: "RunProgress") -> "RunStatus":
    from dlmctl.spec.experiment import status_progress

    return status.model_copy(update=status_progress(progress))


def lines(response) -> Iterator[str]:
    """The lines of a streamed response as they arrive; ends quietly if the connection is cut."""
    pending = b""
    try:
        for chunk in response.stream(64 * 1024, decode_content=True):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.decode("utf-8", errors="replace")
    except Exception as err:  # the pod went away mid-stream, the connection broke, it was shut down
        if not is_connection_error(err) and not isinstance(err, ValueError):
            raise
    finally:
        response.release_conn()
    if pending:
        yield pending.decode("utf-8", errors="replace")


def finished(pod) -> bool:
    return pod.status.phase in ("Succeeded", "Failed") or bool(pod.metadata.deletion_timestamp)


def started(pod) -> bool:
    from .jobs import CONTAINER

    for c in pod.status.container_statuses or []:
        if c.name == CONTAINER or len(pod.spec.containers) == 1:
            return bool(c.state and (c.state.running or c.state.terminated))
    return pod.status.phase in ("Running", "Succeeded", "Failed")


def waiting_reason(pod) -> str:
    for c in pod.status.container_statuses or []:
        if c.state and c.state.waiting and c.state.waiting.reason:
            return c.state.waiting.reason
    for c in pod.status.conditions or []:
        if c.type == "PodScheduled" and c.status != "True":
            return " ".join((c.message or c.reason or "not scheduled").split())
    return pod.status.phase or "Pending"


def phase_words(status: "RunStatus") -> str:
    words = f"run {status.phase}"
    if status.reason:
        words += f" ({status.reason})"
    if status.message:
        words += f": {' '.join(status.message.split())}"
    return words


def terminal(phase) -> bool:
    from dlmctl.spec.contracts import is_terminal

    return is_terminal(str(phase))


def is_connection_error(err: BaseException) -> bool:
    import urllib3

    return isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError, OSError))


def describe(err: BaseException) -> str:
    """A connection or storage error in a few words."""
    text = " ".join(str(getattr(err, "reason", None) or err).split()) or type(err).__name__
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("nodename nor servname", "unknown host"),
                          ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted"),
                          ("No route to host", "no route to host"), ("Connection reset", "connection reset")):
        if needle in text:
            return short
    if isinstance(err, ModuleNotFoundError):
        return f"{err.name} is not installed; pip install 'dlmctl[train]'"
    return redact_text(text[:300])


def json_body(body: Any) -> dict:
    try:
        parsed = json.loads(body) if body else {}
    except (TypeError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}
