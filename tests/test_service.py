"""The API service as a process on the real control plane: `python -m dlmctl.service` with a token bound to
exactly service/manifests.py's ClusterRole. A ServiceAccount allowed experiments in namespace A submits
there (and the operator, a process too, makes the PyTorchJobs), is refused in B; tokens, bodies and specs
that are wrong get 401/413/422 as JSON, never a traceback; and the API is fuzzed from its own OpenAPI."""
from __future__ import annotations

import itertools

import uuid

import httpx
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from dlmctl.spec import GROUP, PLURAL
from operator_harness import Experiments, OperatorProcess, install_operator_rbac, wait_until
from service_harness import grant_experiments
from test_operator import spec as operator_spec

pytestmark = pytest.mark.cluster

ALICE_RULES = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["create", "get", "list", "delete", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]


def document(name: str, **spec) -> dict:
    return {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name},
            "spec": operator_spec(**{"arms": ["diffusion", "autoregressive"], "resources": {"gpus_per_node": 0},
                                     **spec})}


@pytest.fixture(scope="module")
def world(cluster, s3_server, service, tmp_path_factory):
    """Namespaces A and B, alice (experiments and pod logs in A only), the service and the operator."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"svc-a-{tag}", f"svc-b-{tag}"
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        for ns in (a, b):
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        alice = grant_experiments(cluster, a, "alice", rules=ALICE_RULES)
        operator = OperatorProcess(install_operator_rbac(cluster), tmp_path_factory.mktemp("operator") / "operator.log",
                                   env=s3_server.env()).start()
        try:
            yield {"a": a, "b": b, "alice": alice, "service": service, "operator": operator,
                   "experiments": Experiments(api, a), "http": httpx.Client(base_url=service.url, timeout=60)}
        finally:
            operator.stop()
            for ns in (a, b):
                try:
                    core.delete_namespace(ns)
                except ApiException:
                    pass


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"status", "message", "errors", "request_id"} and body["status"] == status
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text
    for fragment in fragments:
        assert fragment in body["message"], body
    return body


def test_alice_submits_in_her_namespace_and_the_operator_makes_the_jobs(world):
    http, a, alice = world["http"], world["a"], world["alice"]
    response = http.post(f"/v1/namespaces/{a}/experiments", json=document("scarce"), headers=bearer(alice))
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["metadata"]["name"] == "scarce" and created["metadata"]["namespace"] == a
    assert [r["phase"] for r in created["status"]["runs"]] == ["Pending", "Pending"]
    assert response.headers["Location"] == f"/v1/namespaces/{a}/experiments/scarce"
    jobs = wait_until("the operator's PyTorchJobs", lambda: len(world["experiments"].jobs("scarce")) == 2,
                      check=world["operator"].check_alive)
    assert jobs

    again = http.post(f"/v1/namespaces/{a}/experiments", json=document("scarce"), headers=bearer(alice))
    assert_error(again, 409, "already exists", "replace=true")
    as_yaml = http.post(f"/v1/namespaces/{a}/experiments", params={"replace": "true"},
                        content=yaml.safe_dump(document("scarce")), headers={**bearer(alice),
                                                                              "Content-Type": "application/yaml"})
    assert as_yaml.status_code == 201, as_yaml.text


def test_alice_reads_cancels_compares_and_deletes_in_her_namespace(world):
    http, a, headers = world["http"], world["a"], bearer(world["alice"])
    assert http.post(f"/v1/namespaces/{a}/experiments", json=document("reader"), headers=headers).status_code == 201
    listed = http.get(f"/v1/namespaces/{a}/experiments", headers=headers).json()["items"]
    (mine,) = [i for i in listed if i["name"] == "reader"]
    assert (mine["namespace"], mine["runs"], set(mine)) == (a, 2, {"name", "namespace", "phase", "runs", "succeeded",
                                                                    "created"})
    got = http.get(f"/v1/namespaces/{a}/experiments/reader", headers=headers).json()
    assert [r["name"] for r in got["status"]["runs"]] == ["reader-dlm", "reader-ar"]

    compared = http.get(f"/v1/namespaces/{a}/experiments/reader/compare", headers=headers)
    assert compared.status_code == 200, compared.text
    body = compared.json()
    assert body["experiment"]["metadata"]["name"] == "reader" and body["evals"] == {}
    assert [p["runs"] for p in body["points"]] == [{"diffusion": "reader-dlm", "autoregressive": "reader-ar"}]

    logs = http.get(f"/v1/namespaces/{a}/experiments/reader/runs/reader-dlm/logs", headers=headers)
    assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/plain"), logs.text
    assert_error(http.get(f"/v1/namespaces/{a}/experiments/reader/runs/reader-xx/logs", headers=headers), 404,
                 "no run 'reader-xx'")

    cancelled = http.post(f"/v1/namespaces/{a}/experiments/reader:cancel", headers=headers)
    assert cancelled.json() == {"cancelled": "reader"}, cancelled.text
    annotations = world["experiments"].get("reader")["metadata"]["annotations"]
    assert "dlmctl.io/cancel-requested" in annotations

    assert http.delete(f"/v1/namespaces/{a}/experiments/reader", headers=headers).json() == {"deleted": "reader"}
    # Foreground deletion: the object goes once its PyTorchJobs have
    wait_until("the experiment gone", lambda: http.get(f"/v1/namespaces/{a}/experiments/reader",
                                                      headers=headers).status_code == 404, timeout=60,
               describe=lambda: _leftovers(world["experiments"], "reader"))
    assert_error(http.get(f"/v1/namespaces/{a}/experiments/reader", headers=headers), 404, "no experiment named")
    assert_error(http.delete(f"/v1/namespaces/{a}/experiments/reader", headers=headers), 404)


def test_a_queue_that_is_not_a_localqueue_of_the_namespace_is_refused_and_nothing_is_created(world, cluster):
    """Asked as the caller: one who may read LocalQueues learns at once (422, the field named); one who may not is
    let through, and the runs wait Queued with Kueue's reason."""
    if not cluster.kueue_served():
        pytest.skip("the cluster runs no Kueue")
    http, a = world["http"], world["a"]
    reader_rules = [*ALICE_RULES, {"apiGroups": ["kueue.x-k8s.io"], "resources": ["localqueues"], "verbs": ["get"]}]
    bob = grant_experiments(cluster, a, "bob", rules=reader_rules)
    queued = document("queued", scheduling={"queue": "nowhere"})
    refused = http.post(f"/v1/namespaces/{a}/experiments", json=queued, headers=bearer(bob))
    body = assert_error(refused, 422, "no LocalQueue 'nowhere'", f"namespace {a!r}")
    assert body["errors"][0]["field"] == "spec.scheduling.queue"
    assert "queued" not in {e["metadata"]["name"] for e in world["experiments"].custom.list_namespaced_custom_object(
        "dlmctl.io", "v1alpha1", a, "experiments")["items"]}
    accepted = http.post(f"/v1/namespaces/{a}/experiments", json=queued, headers=bearer(world["alice"]))
    assert accepted.status_code == 201, accepted.text
    http.delete(f"/v1/namespaces/{a}/experiments/queued", headers=bearer(world["alice"]))


def _leftovers(experiments: Experiments, name: str) -> str:
    """What still holds a deleted experiment: its finalizers and jobs."""
    try:
        meta = experiments.get(name)["metadata"]
    except ApiException as err:
        return f"experiment: {err.status}"
    jobs = [(j["metadata"]["name"], j["metadata"].get("finalizers"), j["metadata"].get("deletionTimestamp"))
            for j in experiments.jobs(name)]
    return f"finalizers {meta.get('finalizers')}, deletionTimestamp {meta.get('deletionTimestamp')}, jobs {jobs}"


def test_who_may_not_is_told_so(world):
    http, a, b = world["http"], world["a"], world["b"]
    refused = http.post(f"/v1/namespaces/{b}/experiments", json=document("elsewhere"), headers=bearer(world["alice"]))
    assert_error(refused, 403, f"system:serviceaccount:{a}:alice may not create experiments.dlmctl.io",
                 f"in namespace '{b}'")
    assert_error(http.get(f"/v1/namespaces/{b}/experiments", headers=bearer(world["alice"])), 403, "may not list")
    missing = http.get(f"/v1/namespaces/{a}/experiments")
    assert_error(missing, 401, "bearer token is required")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert_error(http.get(f"/v1/namespaces/{a}/experiments", headers=bearer("garbage.token.value")), 401,
                 "not valid")


def test_a_malformed_spec_names_every_field_on_its_own_line(world):
    http, a, headers = world["http"], world["a"], bearer(world["alice"])
    bad = document("bad", data={"epochs": 0, "unique_tokens": -5})
    body = assert_error(http.post(f"/v1/namespaces/{a}/experiments", json=bad, headers=headers), 422)
    fields = [e["field"] for e in body["errors"]]
    assert set(fields) == {"spec.data.epochs", "spec.data.unique_tokens"}, body
    assert body["message"].splitlines() == [f"{e['field']}: {e['message']}" for e in body["errors"]]
    elsewhere = {**document("other"), "metadata": {"name": "other", "namespace": world["b"]}}
    body = assert_error(http.post(f"/v1/namespaces/{a}/experiments", json=elsewhere, headers=headers), 422)
    assert body["errors"][0]["field"] == "metadata.namespace"
    assert_error(http.post(f"/v1/namespaces/{a}/experiments", content=b"{not json", headers=headers), 400,
                 "invalid JSON")
    assert_error(http.post(f"/v1/namespaces/{a}/experiments", json=document("Bad_Name"), headers=headers), 422,
                 "metadata.name")


def test_a_10_mb_body_is_refused_and_the_service_answers_on(world):
    http, a, headers = world["http"], world["a"], bearer(world["alice"])
    huge = b"{" + b" " * (10 << 20) + b"}"
    assert_error(http.post(f"/v1/namespaces/{a}/experiments", content=huge,
                           headers={**headers, "Content-Type": "application/json"}), 413, "larger than")

    def chunks():  # no Content-Length: counted while read
        for _ in range(10):
            yield b" " * (1 << 20)

    assert_error(http.post(f"/v1/namespaces/{a}/experiments", content=chunks(), headers=headers), 413)
    assert http.get(f"/v1/namespaces/{a}/experiments", headers=headers).status_code == 200


def test_request_ids_metrics_readiness_and_a_log_without_secrets(world):
    http, a, alice = world["http"], world["a"], world["alice"]
    response = http.get(f"/v1/namespaces/{a}/experiments", headers={**bearer(alice), "X-Request-ID": "trace-42"})
    assert response.headers["X-Request-ID"] == "trace-42"
    assert http.get("/healthz").headers["X-Request-ID"]
    assert http.get("/readyz").json() == {"status": "ready"}
    metrics = http.get("/metrics").text
    assert 'dlm_service_requests_total{method="GET",route="/v1/namespaces/{namespace}/experiments",status="200"}' \
        in metrics
    log = world["service"].log()
    assert "trace-42" in log and f"user=system:serviceaccount:{a}:alice" in log
    assert alice not in log and "garbage.token.value" not in log and "Traceback" not in log


def test_the_openapi_document_is_generated_from_the_spec_models(world):
    from dlmctl.spec import Experiment

    document_ = world["http"].get("/openapi.json").json()
    schemas = document_["components"]["schemas"]
    assert set(Experiment.model_json_schema()["properties"]) == set(schemas["Experiment"]["properties"])
    post = document_["paths"]["/v1/namespaces/{namespace}/experiments"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Experiment"}


def test_fuzzing_every_operation_finds_no_5xx_and_no_answer_outside_the_schema(world):
    import schemathesis
    from schemathesis.specs.openapi.checks import positive_data_acceptance
    from hypothesis import HealthCheck, given, settings

    service, a, alice = world["service"], world["a"], world["alice"]
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=15, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            if case.path_parameters and "namespace" in case.path_parameters:
                case.path_parameters["namespace"] = a
            # A schema cannot say everything the spec's validators check (a cluster run needs an s3:// URI,
            # sweeps must expand into valid runs, ...): a schema-valid body may get a 422.
            case.call_and_validate(base_url=service.url, headers=bearer(alice),
                                   excluded_checks=[positive_data_acceptance])

        try:
            fuzz()
        except Exception as err:  # collect every operation's failure, not just the first
            failures.append(f"{operation.label}: {err}")
    service.check_alive()
    assert not failures, "\n\n".join(failures)
    assert "Traceback" not in service.log()


def test_fuzzing_sequences_that_follow_the_apis_links_finds_no_5xx(world):
    """Stateful: a created experiment's name flows, through the OpenAPI links on the create response, into
    get, cancel, compare and delete of that same experiment."""
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

    service, a, alice = world["service"], world["a"], world["alice"]
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    links = [(path, method) for path, item in world["http"].get("/openapi.json").json()["paths"].items()
             for method, operation in item.items() if any("links" in r for r in operation.get("responses", {}).values())]
    assert links, "the create response names no links: nothing stateful to follow"

    created = itertools.count()

    class Sequences(schema.as_state_machine()):
        def before_call(self, case):
            if case.path_parameters and "namespace" in case.path_parameters:
                case.path_parameters["namespace"] = a
            if case.method == "POST" and case.path == "/v1/namespaces/{namespace}/experiments":
                # Random bodies are almost never valid experiments (the stateless test fuzzes those): create
                # a real one, so the links carry a name that exists into the calls that follow.
                case.body = document(f"seq-{next(created)}")
                case.media_type, case.query = "application/json", {}

        def get_call_kwargs(self, case):
            return {"base_url": service.url, "headers": bearer(alice)}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            # before_call rewrites part of each case (the namespace, the create body), so a case generated as
            # invalid may arrive valid: whether invalid input is refused is the stateless fuzz test's to check.
            case.validate_response(response, excluded_checks=[positive_data_acceptance, negative_data_rejection],
                                   transport_kwargs=kwargs)

    def answered(method: str, route: str, status: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        return sum(sample.value for family in text_string_to_metric_families(world["http"].get("/metrics").text)
                   for sample in family.samples if sample.name == "dlm_service_requests_total"
                   and (sample.labels["method"], sample.labels["route"], sample.labels["status"]) == (method, route, status))

    one = "/v1/namespaces/{namespace}/experiments/{name}"
    before = answered("GET", one, "200")
    Sequences.run(settings=settings(max_examples=10, stateful_step_count=4, deadline=None, database=None,
                                    suppress_health_check=list(HealthCheck)))
    assert next(created) > 0 and answered("GET", one, "200") > before, "no sequence followed a link to its experiment"
    service.check_alive()
    assert "Traceback" not in service.log()
