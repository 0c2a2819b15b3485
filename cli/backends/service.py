"""The dlmctl API service (service/, `python -m dlmctl.service`): the same verbs as the kubernetes backend, over
HTTPS with a bearer token, for people without a kubeconfig. The service checks the token and each action
against the cluster's RBAC and acts on the same Experiment objects, so what `get` and `compare` print is
what the kubernetes backend prints for the same experiment.

    submit   POST   /v1/namespaces/{ns}/experiments?replace=     (the spec as JSON)
    list     GET    /v1/namespaces/{ns}/experiments
    get      GET    /v1/namespaces/{ns}/experiments/{name}
    logs     GET    /v1/namespaces/{ns}/experiments/{name}/runs/{run}/logs?follow=   (text, streamed)
    cancel   POST   /v1/namespaces/{ns}/experiments/{name}:cancel
    compare  GET    /v1/namespaces/{ns}/experiments/{name}/compare  ({experiment, evals, points})

The token comes from $DLMCTL_TOKEN or the context in the config file (cli/contexts.py), never from the
command line. TLS certificates are verified (against a context's CA bundle if it names one). Every failure
is one line: the server unreachable, the token refused (401), a verb not allowed in a namespace (403), an
unknown experiment (404, NotFound as for the other backends), or the service's own message.
"""
from __future__ import annotations

import ssl
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional
from urllib.parse import quote, urlsplit

import httpx

from ..errors import NotFound, UserError, one_line
from .base import ClusterBackend, Comparison, ExperimentSummary

if TYPE_CHECKING:
    from dlmctl.spec import Experiment

TIMEOUT = httpx.Timeout(30.0, connect=5.0)  # seconds to connect, to wait for one answer
FOLLOW_TIMEOUT = httpx.Timeout(None, connect=5.0)  # a followed log may be quiet for a long time
LOG_PATH = "/v1/namespaces/{ns}/experiments/{name}/runs/{run}/logs"


class ServiceApiError(UserError):
    """The service refused a request; `status` is its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ServiceBackend(ClusterBackend):
    name = "service"

    def __init__(self, server_url: str, token: Optional[str], namespace: Optional[str] = None, *,
                 default_namespace: Optional[str] = None, ca_file: Optional[str] = None,
                 token_source: str = "$DLMCTL_TOKEN", timeout: httpx.Timeout = TIMEOUT,
                 transport: Optional[httpx.BaseTransport] = None):
        """`namespace` is the one asked for (-n), `default_namespace` a context's; `token_source` says where the
        token came from, for the line that explains a refused token."""
        from dlmctl.spec.sections import package_version

        self.server = normalize_server(server_url)
        self.explicit_namespace = namespace
        self.namespace = namespace or default_namespace or "default"
        self.has_token, self.token_source = bool(token), token_source
        headers = {"User-Agent": f"dlmctl/{package_version() or 'unknown'}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout, transport=transport,
                                  verify=_tls(ca_file), follow_redirects=False)  # a token never follows a redirect

    def where(self, experiment: Optional["Experiment"] = None) -> str:
        return f"the service backend: {self.server}, namespace {self._namespace_for(experiment)}"

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, experiment: "Experiment", replace: bool = False, fresh: bool = False) -> list[str]:
        name, namespace = self._submittable(experiment, fresh)
        body = experiment.model_dump(mode="json", exclude_none=True, exclude={"status"})
        body["metadata"]["namespace"] = namespace
        try:
            self._request("create", "POST", _path(namespace), namespace, json=body,
                          params={"replace": "true" if replace else "false"})
        except ServiceApiError as err:
            if err.status != 409:
                raise
            raise UserError(
                f"metadata.name: experiment {name!r} already exists in namespace {namespace!r} "
                f"({self._phase_of(name, namespace)}); pass --replace to replace it, or choose another name"
            ) from None
        return [run.name for run in experiment.runs()]

    def _phase_of(self, name: str, namespace: str) -> str:
        try:
            obj = self._request("get", "GET", _path(namespace, name), namespace, name=name).json()
        except (UserError, ValueError):
            return "unknown phase"
        return (obj.get("status") or {}).get("phase") or "Pending"

    # -- list / get -----------------------------------------------------------------------------
    def list(self, all_namespaces: bool = False) -> list[ExperimentSummary]:
        if all_namespaces:
            raise UserError("--all-namespaces: the service lists one namespace at a time; choose it with -n")
        items = self._json("list", "GET", _path(self.namespace), self.namespace).get("items") or []
        summaries = [ExperimentSummary(
            name=i["name"], phase=i.get("phase") or "Pending", runs=int(i.get("runs") or 0),
            succeeded=int(i.get("succeeded") or 0), namespace=i.get("namespace") or self.namespace,
            created=datetime.fromisoformat(i["created"].replace("Z", "+00:00")) if i.get("created") else None,
        ) for i in items]
        return sorted(summaries, key=lambda s: (s.created is None, s.created or 0, s.namespace or "", s.name))

    def get(self, name: str) -> "Experiment":
        return _experiment(self._json("get", "GET", _path(self.namespace, name), self.namespace, name=name))

    # -- logs -----------------------------------------------------------------------------------
    def logs(self, name: str, run: Optional[str] = None, follow: bool = False) -> Iterator[str]:
        from dlmctl.operator.client import merged, phase_words

        statuses = {r.name: r for r in self.get(name).status.runs}
        runs = list(statuses)
        if run is not None and run not in runs:
            raise NotFound(f"--run: experiment {name!r} has no run {run!r} (its runs: {', '.join(runs)})")
        selected = [run] if run else runs
        prefix = (lambda r: f"[{r}] ") if len(selected) > 1 else (lambda r: "")
        if not follow:
            for r in selected:
                empty = True
                for line in self._log_lines(name, r, follow=False):
                    empty = False
                    yield prefix(r) + line
                if empty:
                    print(f"{r}: no log yet ({phase_words(statuses[r])})", file=sys.stderr, flush=True)
            return

        def worker(r: str) -> Callable:
            def stream(emit, stop):
                for line in self._log_lines(name, r, follow=True):
                    if stop.is_set():
                        return
                    emit(prefix(r) + line)
            return stream

        yield from merged([worker(r) for r in selected])

    def _log_lines(self, name: str, run: str, follow: bool) -> Iterator[str]:
        path = LOG_PATH.format(ns=quote(self.namespace, safe=""), name=quote(name, safe=""), run=quote(run, safe=""))
        request = self._http.build_request("GET", path, params={"follow": "true" if follow else "false"},
                                           headers={"Accept": "text/plain"},
                                           timeout=FOLLOW_TIMEOUT if follow else self._http.timeout)
        response = self._send("read the logs of", request, self.namespace, name=name, stream=True)
        try:
            yield from response.iter_lines()
        except httpx.TransportError as err:  # the stream was cut: the lines so far stand, say why it stopped
            raise UserError(f"the log of run {run} from {self.server} was cut off: {_describe(err)}") from None
        finally:
            response.close()

    # -- cancel / compare -----------------------------------------------------------------------
    def cancel(self, name: str) -> None:
        self._request("cancel", "POST", _path(self.namespace, name) + ":cancel", self.namespace, name=name)

    def compare(self, name: str) -> Comparison:
        """The experiment with its freshest status and each run's evaluations, as the service read them
        from the runs' stores: the same Comparison the kubernetes backend builds on this machine."""
        from dlmctl.spec.contracts import EvalEvent

        answer = self._json("get", "GET", _path(self.namespace, name) + "/compare", self.namespace, name=name)
        try:
            experiment = _experiment(answer["experiment"])
            evals = {run: [EvalEvent.model_validate(e) for e in events]
                     for run, events in (answer.get("evals") or {}).items()}
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{self.server} answered compare for {name!r} with something else than a "
                            f"comparison ({one_line(err)[:200]}); is it a dlmctl service of this version?") from None
        return Comparison(experiment, evals)

    # -- requests -------------------------------------------------------------------------------
    def _json(self, verb: str, method: str, path: str, namespace: str, name: Optional[str] = None) -> Any:
        response = self._request(verb, method, path, namespace, name=name)
        try:
            return response.json()
        except ValueError:
            raise UserError(f"{self.server} answered {method} {path} with something else than JSON; "
                            "is it a dlmctl service?") from None

    def _request(self, verb: str, method: str, path: str, namespace: str, name: Optional[str] = None,
                 **kwargs) -> httpx.Response:
        return self._send(verb, self._http.build_request(method, path, **kwargs), namespace, name=name)

    def _send(self, verb: str, request: httpx.Request, namespace: str, name: Optional[str] = None,
              stream: bool = False) -> httpx.Response:
        """One request; what goes wrong becomes one line naming what was asked and of whom."""
        try:
            response = self._http.send(request, stream=stream)
        except httpx.TransportError as err:
            raise UserError(f"cannot reach the dlmctl service {self.server}: {_describe(err)}") from None
        if response.is_success:
            return response
        if stream:
            response.read()
        response.close()
        raise self._refused(response, verb, namespace, name)

    def _refused(self, response: httpx.Response, verb: str, namespace: str, name: Optional[str]) -> UserError:
        status = response.status_code
        body = _json_body(response)
        message = "; ".join(line.strip() for line in str(body.get("message") or "").splitlines() if line.strip())
        where = f"in namespace {namespace!r}"
        if not body:  # no error document of the service: a proxy, or not a dlmctl service at all
            return ServiceApiError(f"{self.server} answered {status} {response.reason_phrase} to "
                                   f"{response.request.method} {response.request.url.path}; is it a dlmctl service?",
                                   status)
        if status == 401:
            if not self.has_token:
                return ServiceApiError(f"unauthorized: {self.server} needs a token; set $DLMCTL_TOKEN or store "
                                       "one with `dlmctl config set-token CONTEXT`", 401)
            return ServiceApiError(f"unauthorized: the server {self.server} refused the token (from "
                                   f"{self.token_source}); is it expired or for another cluster?", 401)
        if status == 403:
            return ServiceApiError(f"permission denied: not allowed to {verb} experiments {where} ({self.server}"
                                   + (f": {message}" if message else "") + "); ask a cluster admin for a Role that "
                                   "allows it", 403)
        if status == 404 and name:
            return NotFound(f"no experiment named {name!r} {where} ({self.server}; dlmctl list shows them)")
        if status == 413:
            return ServiceApiError(f"the experiment is larger than {self.server} accepts: {message}", 413)
        target = f"experiment {name}" if name else "experiments"
        if status in (400, 409, 422):
            return ServiceApiError(f"{self.server} refused to {verb} {target} {where}: {message}", status)
        request_id = body.get("request_id") or response.headers.get("X-Request-ID")
        return ServiceApiError(f"cannot {verb} {target} {where}: {self.server} answered {status} "
                               f"{response.reason_phrase}: {message or 'no message'}"
                               + (f" (request {request_id})" if request_id else ""), status)


def _experiment(obj: dict) -> "Experiment":
    """The service's Experiment JSON as the kubernetes backend reads the cluster's (operator/client.py)."""
    from dlmctl.operator.client import InvalidExperiment, experiment_with_runs

    try:
        return experiment_with_runs(obj)
    except InvalidExperiment as err:
        raise UserError(err.message) from None


def normalize_server(url: str) -> str:
    """An http(s) URL without a trailing slash: how contexts and --server are compared."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--server: {url!r} is not an http:// or https:// URL of the dlmctl service")
    if parts.query or parts.fragment:
        raise UserError(f"--server: {url!r} has a query or fragment; give the service's base URL")
    return url.strip().rstrip("/")


def _tls(ca_file: Optional[str]):
    """Verification always; against the context's CA bundle if it names one."""
    if not ca_file:
        return True
    path = Path(ca_file).expanduser()
    try:
        return ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as err:
        why = one_line(getattr(err, "strerror", None) or err)
        raise UserError(f"ca-file: cannot use {path} as a CA bundle ({why})") from None


def _path(namespace: str, name: Optional[str] = None) -> str:
    path = f"/v1/namespaces/{quote(namespace, safe='')}/experiments"
    return f"{path}/{quote(name, safe='')}" if name is not None else path


def _json_body(response: httpx.Response) -> dict:
    try:
        parsed = response.json()
    except ValueError:
        return {}
    is_service_error = isinstance(parsed, dict) and "message" in parsed and "request_id" in parsed
    return parsed if is_service_error else {}  # not the service's error document: a proxy, another server


def _describe(err: BaseException) -> str:
    text = one_line(str(err) or type(err).__name__)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("nodename nor servname", "unknown host"),
                          ("Temporary failure in name resolution", "unknown host"),
                          ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted (a context's "
                                                        "ca-file names the CA bundle to trust)"),
                          ("WRONG_VERSION_NUMBER", "it does not speak TLS (an http:// URL?)"),
                          ("No route to host", "no route to host"), ("Connection reset", "connection reset")):
        if needle in text:
            return short
    if isinstance(err, httpx.TimeoutException):
        return "timed out"
    return text[:300]
