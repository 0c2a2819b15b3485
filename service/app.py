"""The HTTP API: Experiments in a namespace, for a caller with a bearer token (auth.py decides who and
whether, cluster.py acts as them). Every answer carries X-Request-ID; every error is JSON (models.ErrorBody)
and never a traceback; logs name the request ID, route, status and user -- never a token or a spec's values.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from typing import Annotated, Any, Callable, Iterator, Optional

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dlmctl.operator import client as experiments
from dlmctl.spec import Experiment, SpecError, experiment_from_dict, parse_yaml
from dlmctl.spec.comparison import Axis, Metric, compare
from dlmctl.spec.experiment import DNS_1123_LABEL, MAX_LABEL
from dlmctl.spec.redact import redact_text

from .auth import Action, Authorizer, Denied, ReviewFailed, Unauthenticated
from .cluster import Caller, Cluster
from .metrics import ServiceMetrics
from .models import Cancelled, ComparisonBody, Deleted, ErrorBody, ExperimentList, ExperimentSummary, Health
from dlmctl.spec.settings import ServiceSettings

log = logging.getLogger("dlmctl.service")
REQUEST_ID = "X-Request-ID"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]-]*): (.+)$", re.S)
BODY_SOURCE = "request body"
PUBLIC = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")

Namespace = Annotated[str, Path(pattern=DNS_1123_LABEL.pattern, max_length=MAX_LABEL,
                                description="the Kubernetes namespace")]
Name = Annotated[str, Path(pattern=DNS_1123_LABEL.pattern, max_length=MAX_LABEL, description="the experiment")]
RunName = Annotated[str, Path(pattern=DNS_1123_LABEL.pattern, max_length=MAX_LABEL, description="a run")]


class ApiError(Exception):
    def __init__(self, status: int, message: str, errors: Optional[list[tuple[str, str]]] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.errors, self.headers = status, message, errors or [], headers


class BodyTooLarge(Exception):
    pass


def error_response(request_id: str, status: int, message: str, errors: list[tuple[str, str]] = (),
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    body = ErrorBody(status=status, message=message, request_id=request_id,
                     errors=[{"field": f, "message": m} for f, m in errors])
    return JSONResponse(body.model_dump(mode="json"), status_code=status,
                        headers={**(headers or {}), REQUEST_ID: request_id})


def spec_errors(err: SpecError) -> tuple[str, list[tuple[str, str]]]:
    """(one line per error, [(field, message)]) of a SpecError raised for the request body."""
    lines = err.errors or [str(err).removeprefix(f"{BODY_SOURCE}: ")]
    pairs = []
    for line in lines:
        match = _FIELD.match(line)
        pairs.append((match.group(1), match.group(2)) if match and not line.startswith("line ") else ("", line))
    return "\n".join(lines), pairs


bearer = HTTPBearer(auto_error=False, description="a Kubernetes bearer token (e.g. a ServiceAccount's)")


async def authenticated(request: Request,
                        credentials: Annotated[Optional[HTTPAuthorizationCredentials], Depends(bearer)]) -> Caller:
    """The caller of the request's bearer token (TokenReview, on a worker thread unless its answer is cached):
    ApiError 401 without a valid one."""
    header = f"Bearer {credentials.credentials}" if credentials else request.headers.get("authorization")
    authorizer = request.app.state.authorizer
    try:
        who = authorizer.authenticated(header) or await run_in_threadpool(authorizer.authenticate, header)
    except Unauthenticated as err:
        raise ApiError(401, str(err), headers={"WWW-Authenticate": "Bearer"}) from None
    except ReviewFailed as err:
        raise ApiError(503, str(err)) from None
    request.scope["state"]["user"] = who.username
    return who


CallerDep = Annotated[Caller, Depends(authenticated)]


class RequestContext:
    """Outermost of ours (pure ASGI): the request ID, the body size limit (Content-Length checked at once,
    the bytes counted as they are read), the access log line, the metrics, and a JSON 500 for any error
    that escaped the handlers."""

    def __init__(self, app, max_body_bytes: int, metrics: ServiceMetrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get(REQUEST_ID.lower(), "")
        request_id = given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started, status, limit = time.monotonic(), [0], self.max_body_bytes

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [h for h in message["headers"] if h[0].lower() != b"x-request-id"]
                message["headers"].append((b"x-request-id", request_id.encode()))
                self._observe(scope, status[0], started)
            await send(message)

        received = [0]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise BodyTooLarge()
            return message

        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = 0
        try:
            if length > limit:
                response = error_response(request_id, 413, f"the request body is larger than {limit} bytes")
                return await response(scope, receive, send_with_id)
            await self.app(scope, limited_receive, send_with_id)
        except Exception as err:
            if status[0]:  # the answer had started (a streamed log): it just ends
                log.warning("request %s: the streamed answer ended early: %s", request_id,
                            redact_text(type(err).__name__))
                return
            if isinstance(err, BodyTooLarge):
                response = error_response(request_id, 413, f"the request body is larger than {limit} bytes")
            else:
                log.error("request %s: internal error %s: %s", request_id, type(err).__name__,
                          redact_text(" ".join(str(err).split()))[:500])
                response = error_response(request_id, 500, f"internal error (request {request_id})")
            await response(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            user = scope["state"].get("user", "-")
            log.info("request %s %s %s %s %.1fms user=%s", request_id, scope["method"], route, status[0],
                     (time.monotonic() - started) * 1000, user)

    def _observe(self, scope, status: int, started: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.metrics.observe(scope["method"], route, status, time.monotonic() - started)


def create_app(settings: Optional[ServiceSettings] = None, cluster: Optional[Cluster] = None) -> FastAPI:
    from dlmctl.spec.sections import package_version

    settings = settings or ServiceSettings()
    cluster = cluster or Cluster(settings)
    authorizer = Authorizer(cluster.service_client(), settings.auth_cache_seconds)
    metrics = ServiceMetrics()
    app = FastAPI(title="dlmctl", version=package_version() or "0", separate_input_output_schemas=False,
                  description="Experiments (DLM vs AR under data scarcity) on a Kubernetes cluster, as the "
                              "caller: the cluster's RBAC decides what a token may do.",
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    app.state.authorizer = authorizer
    app.add_middleware(RequestContext, max_body_bytes=settings.max_body_bytes, metrics=metrics)

    def request_id(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex

    # -- errors ---------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(request_id(request), err.status, err.message, err.errors, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return error_response(request_id(request), err.status_code, " ".join(str(err.detail).split()),
                              headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, err: RequestValidationError):
        pairs = [(".".join(str(p) for p in e["loc"]), " ".join(str(e["msg"]).split())) for e in err.errors()]
        return error_response(request_id(request), 422, "\n".join(f"{f}: {m}" for f, m in pairs), pairs)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, err: BodyTooLarge):
        return error_response(request_id(request), 413, f"the request body is larger than {settings.max_body_bytes} "
                                                        "bytes")

    def allowed(who: Caller, *actions: Action) -> None:
        try:
            authorizer.authorize(who, *actions)
        except Denied as err:
            raise ApiError(403, f"forbidden: {err}") from None
        except ReviewFailed as err:
            raise ApiError(503, str(err)) from None

    async def may(who: Caller, *actions: Action) -> None:
        """`allowed`, asked on a worker thread only when the answer is not cached."""
        if not authorizer.authorized(who, *actions):
            await run_in_threadpool(allowed, who, *actions)

    def client_for(who: Caller) -> experiments.ExperimentClient:
        return experiments.ExperimentClient(cluster.client_for(who))

    errors = {code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422, 502, 503)}

    # -- experiments ---------------------------------------------------------------------------------------
    collection = "/v1/namespaces/{namespace}/experiments"
    item = collection + "/{name}"
    links = {name: {"operationId": op, "parameters": {"namespace": "$request.path.namespace",
                                                       "name": "$response.body#/metadata/name"}}
             for name, op in (("GetExperiment", "get_experiment"), ("CancelExperiment", "cancel_experiment"),
                              ("CompareExperiment", "compare_experiment"), ("DeleteExperiment", "delete_experiment"))}

    @app.post(collection, status_code=201, response_model=Experiment, operation_id="create_experiment",
              summary="Submit an experiment",
              responses={**errors, **{c: {"model": ErrorBody} for c in (400, 413, 415)}},
              openapi_extra={
                  "requestBody": {"required": True, "content": {
                      "application/json": {"schema": {"$ref": "#/components/schemas/Experiment"}},
                      "application/yaml": {"schema": {"$ref": "#/components/schemas/Experiment"}}}},
                  "responses": {"201": {"links": links}}})
    async def create_experiment(request: Request, namespace: Namespace, who: CallerDep,
                                replace: Annotated[bool, Query(description="replace an experiment of that name")]
                                = False):
        await may(who, Action("create", namespace), *([Action("delete", namespace)] if replace else []))
        body = await request.body()
        content_type = request.headers.get("content-type", "")

        def parse_and_submit() -> tuple[str, dict]:
            experiment = parse_body(body, content_type, namespace)
            return experiment.metadata.name, submit(client_for(who), experiment, namespace, replace)

        name, created = await run_in_threadpool(parse_and_submit)
        return JSONResponse(created, status_code=201, headers={"Location": f"/v1/namespaces/{namespace}/experiments/"
                                                                          f"{name}"})

    @app.get(collection, response_model=ExperimentList, operation_id="list_experiments", responses=errors,
             summary="The experiments of a namespace, oldest first")
    async def list_experiments(namespace: Namespace, who: CallerDep):
        await may(who, Action("list", namespace))

        def items() -> list[dict]:
            found = cluster_call(lambda: client_for(who).summaries(namespace))
            return [ExperimentSummary(**s).model_dump(mode="json") for s in found]

        return JSONResponse({"items": await run_in_threadpool(items)})

    @app.get(item, response_model=Experiment, operation_id="get_experiment", responses=errors,
             summary="An experiment with the status of every run")
    async def get_experiment(namespace: Namespace, name: Name, who: CallerDep):
        await may(who, Action("get", namespace, name=name))
        return JSONResponse(await run_in_threadpool(
            cluster_call, lambda: experiment_view(client_for(who).read(name, namespace))))

    @app.delete(item, response_model=Deleted, operation_id="delete_experiment", responses=errors,
                summary="Delete an experiment and its jobs (checkpoints are kept)")
    def delete_experiment(namespace: Namespace, name: Name, who: CallerDep):
        allowed(who, Action("delete", namespace, name=name))
        cluster_call(lambda: client_for(who).delete(name, namespace))
        return JSONResponse({"deleted": name})

    @app.post(item + ":cancel", response_model=Cancelled, operation_id="cancel_experiment", responses=errors,
              summary="Stop every unfinished run (checkpoints are kept)")
    def cancel_experiment(namespace: Namespace, name: Name, who: CallerDep):
        from dlmctl.spec.contracts import is_terminal

        allowed(who, Action("get", namespace, name=name), Action("patch", namespace, name=name))
        client = client_for(who)
        phase = cluster_call(lambda: client.get(name, namespace)).status.phase
        if is_terminal(phase):
            return JSONResponse({"cancelled": name, "phase": str(getattr(phase, "value", phase))})
        cluster_call(lambda: client.cancel(name, namespace))
        return JSONResponse({"cancelled": name})

    @app.get(item + "/compare", response_model=ComparisonBody, operation_id="compare_experiment", responses=errors,
             summary="Per sweep point: best and last values, AR overfitting, the crossover, seeds' agreement")
    def compare_experiment(namespace: Namespace, name: Name, who: CallerDep,
                           metric: Annotated[Metric, Query(description="what the arms are compared on")]
                           = Metric.val_loss,
                           by: Annotated[Axis, Query(description="where their evaluations are aligned")]
                           = Axis.tokens):
        allowed(who, Action("get", namespace, name=name))
        experiment, evals, failed = cluster_call(lambda: client_for(who).compare(name, namespace))
        if failed:
            log.warning("compare %s/%s: cannot read %s (%s); the operator's last status is shown", namespace, name,
                        redact_text(failed[0]), experiments.describe(failed[1]))
        report = compare(experiment, evals, metric, by)
        body = ComparisonBody.model_construct(**dict(report), experiment=experiment, evals=evals)
        return Response(body.model_dump_json(), media_type="application/json")  # a diverged run's NaN: null

    @app.get(item + "/runs/{run}/logs", operation_id="run_logs", response_class=StreamingResponse,
             responses={**errors, 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                        "description": "the run's master pod log, line by line"}},
             summary="The log of a run's master pod (follow: until the run ends)")
    def run_logs(namespace: Namespace, name: Name, run: RunName, who: CallerDep,
                 follow: Annotated[bool, Query(description="keep streaming until the run ends")] = False):
        allowed(who, Action("get", namespace, name=name), Action("get", namespace, "pods", "", "log"))
        client = client_for(who)
        runs = [r.name for r in cluster_call(lambda: client.get(name, namespace)).status.runs]
        if run not in runs:
            raise ApiError(404, f"experiment {name!r} in namespace {namespace!r} has no run {run!r}")
        stop = threading.Event()
        if follow:
            lines = experiments.merged([lambda emit, stop: client.follow_run(
                name, run, namespace, emit, stop, note=lambda text: log.info("logs %s/%s: %s", namespace, name, text))],
                stop)
        else:
            lines = cluster_call(lambda: pod_log(client, run, namespace))
        return StreamingResponse(streamed(lines, stop), media_type="text/plain; charset=utf-8")

    # -- the process ---------------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, operation_id="healthz", summary="The process is alive")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, operation_id="readyz", responses={503: {"model": ErrorBody}},
             summary="The Kubernetes API server answers")
    def readyz(request: Request):
        from kubernetes import client

        try:
            client.VersionApi(cluster.service_client()).get_code(_request_timeout=(2, 5))
        except Exception as err:
            raise ApiError(503, f"the Kubernetes API server does not answer: {experiments.describe(err)}") from None
        return {"status": "ready"}

    @app.get("/metrics", operation_id="metrics", include_in_schema=False)
    def prometheus_metrics():
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return app


# -- what the routes do ---------------------------------------------------------------------------------------

def parse_body(body: bytes, content_type: str, namespace: str) -> Experiment:
    """The Experiment of a request body (JSON or YAML), validated by the spec's models and ready for a cluster
    (an s3:// checkpoint URI): ApiError 400/415/422 otherwise."""
    from dlmctl.operator.jobs import check_cluster_ready

    media = content_type.split(";")[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"{BODY_SOURCE}: not UTF-8 text") from None
    try:
        if media in ("", "application/json") or media.endswith("+json"):
            try:
                data = json.loads(text) if text.strip() else None
            except (ValueError, RecursionError) as err:
                raise ApiError(400, f"{BODY_SOURCE}: invalid JSON: {' '.join(str(err).split())[:200]}") from None
        elif media in ("application/yaml", "application/x-yaml", "text/yaml"):
            try:
                data = parse_yaml(text, BODY_SOURCE)
            except SpecError as err:  # not YAML, or YAML that no spec is (aliases, too deep, ...)
                raise ApiError(400, str(err)) from None
        else:
            raise ApiError(415, f"content type {media!r}: send application/json or application/yaml")
        experiment = experiment_from_dict(data, BODY_SOURCE, require_header=True)
        own = experiment.metadata.namespace
        if own and own != namespace:
            raise ApiError(422, f"metadata.namespace: {own!r} is not the namespace of the URL ({namespace!r})",
                           [("metadata.namespace", f"{own!r} is not the namespace of the URL ({namespace!r})")])
        check_cluster_ready(experiment)
    except SpecError as err:
        message, pairs = spec_errors(err)
        raise ApiError(422, message, pairs) from None
    return experiment


def submit(client: experiments.ExperimentClient, experiment: Experiment, namespace: str, replace: bool) -> dict:
    name = experiment.metadata.name
    try:
        client.check_queues(experiment, namespace)
    except SpecError as err:  # a queue that is not there: nothing created, nothing replaced
        message, pairs = spec_errors(err)
        raise ApiError(422, message, pairs) from None
    except experiments.ClientError as err:
        raise api_error(err) from None
    if replace:
        cluster_call(lambda: client.delete_and_wait(name, namespace))
    try:
        created = client.create(experiment, namespace)
    except experiments.Conflict:
        phase = client.phase_of(name, namespace)
        raise ApiError(409, f"experiment {name!r} already exists in namespace {namespace!r} ({phase}); "
                            "pass replace=true to replace it, or choose another name",
                       [("metadata.name", "already exists")]) from None
    except experiments.ClientError as err:
        raise api_error(err) from None
    return cluster_call(lambda: experiment_view(created))


@experiments.per_object_version(maxsize=1024)
def experiment_view(obj: dict) -> dict:
    """The JSON answer for a stored Experiment object (`experiment_with_runs`, dumped). Validating costs
    milliseconds, so the answer is kept per object version (an invalid object raises as before and is not kept).
    Never mutate what this returns."""
    return experiments.experiment_with_runs(obj).model_dump(mode="json")


def pod_log(client: experiments.ExperimentClient, run: str, namespace: str) -> Iterator[str]:
    """The master pod's log so far (nothing when it has no pod, or has not started)."""
    pod = client.master_pod(run, namespace)
    if pod is None or not experiments.started(pod):
        return iter(())
    try:
        return experiments.lines(client.open_log(pod, namespace, follow=False))
    except experiments.ClientError as err:
        if err.status == 400:  # the kubelet has no log for it (yet)
            return iter(())
        raise


async def streamed(lines: Iterator[str], stop: threading.Event):
    """Lines as bytes, each read on a worker thread; the workers are told to stop when the client goes."""
    end = object()
    try:
        while True:
            line = await run_in_threadpool(next, lines, end)
            if line is end:
                return
            yield (line + "\n").encode()
    except experiments.ClientError as err:
        log.warning("a streamed log ended: %s", api_error(err).message)
    finally:
        stop.set()


def cluster_call(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except experiments.ClientError as err:
        raise api_error(err) from None
    except SpecError as err:  # a stored object that is no valid Experiment
        raise ApiError(409, f"the stored experiment is not valid: {' '.join(str(err).split())}") from None


def api_error(err: experiments.ClientError) -> ApiError:
    """The HTTP answer for what the API server said when asked as the caller."""
    where = f"in namespace {err.namespace!r}" if err.namespace else "in any namespace"
    what = "experiment" if err.resource == experiments.RESOURCE else err.resource.rstrip("s")
    if isinstance(err, experiments.NotFound):
        return ApiError(404, f"no {what} named {err.name!r} {where}")
    if isinstance(err, experiments.NotInstalled):
        return ApiError(503, f"the Experiment resource ({experiments.RESOURCE}) is not installed in the cluster")
    if isinstance(err, experiments.Forbidden):
        return ApiError(403, f"forbidden: {err.user or 'the caller'} may not {err.verb} {err.resource} {where}")
    if isinstance(err, (experiments.Unauthorized, experiments.Unreachable)):
        log.error("the Kubernetes API server: %s %s", type(err).__name__, err.message)
        return ApiError(503, "the Kubernetes API server cannot be used right now")
    if isinstance(err, experiments.StillDeleting):
        return ApiError(409, f"experiment {err.name!r} {where} is {err.message}; try again later")
    if isinstance(err, (experiments.Conflict, experiments.InvalidExperiment)):
        return ApiError(409, err.message or f"{what} {err.name!r} {where}: conflict")
    if isinstance(err, experiments.Invalid):
        return ApiError(422, f"the API server refused to {err.verb} {what} {err.name or ''} {where}: {err.message}")
    log.error("the Kubernetes API server answered %s to %s %s: %s", err.status, err.verb, err.resource, err.message)
    return ApiError(502, f"the Kubernetes API server answered {err.status} {err.reason}".strip())
