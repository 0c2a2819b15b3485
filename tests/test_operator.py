"""The operator on the real control plane: an Experiment becomes one PyTorchJob per run (exactly what
`dlmctl render` prints), its status follows the jobs and pods, preempted and failed runs are recreated
up to max_restarts, deterministic failures fail at once, cancel suspends, replicas elect one leader,
and the operator works with nothing but its own ClusterRole. Pods here finish when a test says so
(KWOK); tests/test_cluster_e2e.py runs the real trainer."""
from __future__ import annotations

import copy
import time

import pytest
from kubernetes import client

from dlmctl.operator.jobs import ANNOTATION_CANCEL, ANNOTATION_RESTARTS
from dlmctl.operator.render import job_manifests
from dlmctl.spec import experiment_from_dict
from operator_harness import Experiments, OperatorProcess, install_operator_rbac, wait_until

pytestmark = pytest.mark.cluster

SPEC = {
    "model": {"preset": "nano"},
    "data": {"unique_tokens": 8192, "epochs": 1, "seq_len": 64},
    "batch": {"global_sequences": 64, "micro_batch_sequences": 1},
    "resources": {"nodes": 1, "gpus_per_node": 8},
    "checkpoint": {"uri": "s3://dlmctl-test/operator"},
    "scheduling": {"max_restarts": 2},
}


def spec(**overrides) -> dict:
    out = copy.deepcopy(SPEC)
    for key, value in overrides.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="module")
def operator(cluster, s3_server, tmp_path_factory):
    """One operator for the module, with the S3 server's credentials (progress is read from stores)."""
    kubeconfig = install_operator_rbac(cluster)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(kubeconfig, log, env=s3_server.env()).start()
    yield process
    process.stop()
    print(f"operator log: {log}")


@pytest.fixture
def experiments(cluster, cluster_namespace, operator):
    with cluster.api_client() as api:
        yield Experiments(api, cluster_namespace)


def server_set(obj: dict) -> dict:
    """An object as its creator sent it: without what the API server and controllers add."""
    out = copy.deepcopy(obj)
    out.pop("status", None)
    for key in ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "ownerReferences"):
        out["metadata"].pop(key, None)
    return out


def added_by_server(sent, stored, path="") -> list[str]:
    """The paths the stored object has beyond what was sent; fails if a sent value was changed or lost."""
    if isinstance(sent, dict):
        assert isinstance(stored, dict), path
        extra = [f"{path}.{k}" for k in stored if k not in sent]
        for key, value in sent.items():
            assert key in stored, f"{path}.{key} was lost"
            extra += added_by_server(value, stored[key], f"{path}.{key}")
        return extra
    if isinstance(sent, list):
        assert isinstance(stored, list) and len(stored) == len(sent), path
        return [p for i, (a, b) in enumerate(zip(sent, stored)) for p in added_by_server(a, b, f"{path}[{i}]")]
    assert sent == stored, f"{path}: sent {sent!r}, stored {stored!r}"
    return []


# What the API server fills in from the PyTorchJob CRD's schema defaults: not the operator's doing.
SCHEMA_DEFAULTS = {"protocol", "suspend"}


def test_each_run_becomes_exactly_the_pytorchjob_that_render_prints(experiments, operator):
    body = spec(sweep={"data.epochs": [1, 2]})
    created = experiments.create("render", body, labels={"team": "lm"})
    document = {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment",
                "metadata": {"name": "render", "namespace": experiments.namespace, "labels": {"team": "lm"}},
                "spec": body}
    rendered = {j["metadata"]["name"]: j for j in job_manifests(experiment_from_dict(document))}
    assert len(rendered) == 4

    jobs = wait_until("4 PyTorchJobs", lambda: (j if len(j := experiments.jobs("render")) == 4 else None),
                      check=operator.check_alive)
    for job in jobs:
        name = job["metadata"]["name"]
        extra = added_by_server(rendered[name], server_set(job))
        assert {p.rsplit(".", 1)[-1] for p in extra} <= SCHEMA_DEFAULTS, extra
        (owner,) = job["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "Experiment", "render", created["metadata"]["uid"], True)
    status = wait_until("a status for 4 runs", lambda: (s if len((s := experiments.status("render")).get("runs") or [])
                                                            == 4 else None), check=operator.check_alive)
    assert sorted(r["name"] for r in status["runs"]) == sorted(rendered)
    assert status["progress"] == "0/4"


def test_a_run_goes_pending_running_succeeded_and_the_experiment_with_it(experiments, cluster, operator):
    experiments.create("ok", spec(arms=["diffusion", "autoregressive"]))
    for run in ("ok-dlm", "ok-ar"):
        experiments.wait_run("ok", run, "Running", check=operator.check_alive)
    assert experiments.status("ok")["phase"] == "Running"
    (pod,) = experiments.pods("ok-dlm")
    cluster.mark_pod(pod.metadata.name, experiments.namespace, "Succeeded")
    done = experiments.wait_run("ok", "ok-dlm", "Succeeded", check=operator.check_alive)
    assert done["completionTime"] >= done["startTime"]
    assert experiments.status("ok")["phase"] == "Running", "one run is still running"
    (pod,) = experiments.pods("ok-ar")
    cluster.mark_pod(pod.metadata.name, experiments.namespace, "Succeeded")
    status = experiments.wait_phase("ok", "Succeeded", check=operator.check_alive)
    assert status["progress"] == "2/2" and status["completionTime"]


def test_pods_that_cannot_be_placed_make_the_run_unschedulable_with_the_schedulers_word(experiments, operator):
    experiments.create("huge", spec(arms=["diffusion"], resources={"gpus_per_node": 64, "nodes": 1}))
    run = experiments.wait_run("huge", "huge-dlm", "Unschedulable", check=operator.check_alive)
    assert "Insufficient nvidia.com/gpu" in run["message"], run
    time.sleep(2)
    assert experiments.runs("huge")["huge-dlm"]["phase"] == "Unschedulable", "never Running"
    assert experiments.status("huge")["phase"] == "Pending"


def test_exit_code_2_is_a_user_error_failed_at_once_and_not_retried(experiments, cluster, operator):
    experiments.create("usererr", spec(arms=["diffusion"]))
    experiments.wait_run("usererr", "usererr-dlm", "Running", check=operator.check_alive)
    uid = experiments.job("usererr-dlm")["metadata"]["uid"]
    (pod,) = experiments.pods("usererr-dlm")
    cluster.mark_pod(pod.metadata.name, experiments.namespace, "Failed", exit_code=2)
    run = experiments.wait_run("usererr", "usererr-dlm", "Failed", check=operator.check_alive)
    assert (run["reason"], run["restarts"]) == ("UserError", 0), run
    time.sleep(3)
    job = experiments.job("usererr-dlm")
    assert job["metadata"]["uid"] == uid, "the job was not recreated"
    assert job["spec"]["runPolicy"]["suspend"] is True, "its remaining pods are stopped, freeing the GPUs"
    assert experiments.status("usererr")["phase"] == "Failed"


def test_failures_are_retried_with_a_new_job_until_max_restarts(experiments, cluster, operator):
    experiments.create("flaky", spec(arms=["diffusion"], scheduling={"max_restarts": 2}))
    uids = []
    for attempt in range(3):
        experiments.wait_run("flaky", "flaky-dlm", "Running", timeout=90, check=operator.check_alive)
        job = experiments.job("flaky-dlm")
        uids.append(job["metadata"]["uid"])
        assert job["metadata"].get("annotations", {}).get(ANNOTATION_RESTARTS, "0") == str(attempt)
        (pod,) = [p for p in experiments.pods("flaky-dlm") if p.status.phase == "Running"]
        cluster.mark_pod(pod.metadata.name, experiments.namespace, "Failed", exit_code=1)
        if attempt < 2:
            restarting = experiments.wait_run("flaky", "flaky-dlm", "Restarting", check=operator.check_alive)
            assert restarting["restarts"] == attempt + 1, restarting
    run = experiments.wait_run("flaky", "flaky-dlm", "Failed", check=operator.check_alive)
    assert (run["reason"], run["restarts"]) == ("RestartLimitReached", 2), run
    assert "max_restarts: 2" in run["message"]
    assert len(set(uids)) == 3, "each retry is a new PyTorchJob"


def test_an_evicted_pod_makes_the_run_preempted_and_its_job_is_recreated(experiments, cluster, operator):
    experiments.create("evict", spec(arms=["diffusion"], resources={"nodes": 2, "gpus_per_node": 8}))
    experiments.wait_run("evict", "evict-dlm", "Running", check=operator.check_alive)
    first = experiments.job("evict-dlm")["metadata"]["uid"]
    worker = next(p for p in experiments.pods("evict-dlm") if "worker" in p.metadata.name)
    experiments.core.create_namespaced_pod_eviction(
        worker.metadata.name, experiments.namespace,
        client.V1Eviction(metadata=client.V1ObjectMeta(name=worker.metadata.name, namespace=experiments.namespace)))
    preempted = experiments.wait_run("evict", "evict-dlm", "Preempted", check=operator.check_alive)
    assert preempted["reason"] == "EvictionByEvictionAPI" and preempted["restarts"] == 1, preempted
    assert "resuming from its last verified checkpoint" in preempted["message"]
    run = experiments.wait_run("evict", "evict-dlm", "Running", timeout=90, check=operator.check_alive)
    job = experiments.job("evict-dlm")
    assert job["metadata"]["uid"] != first and job["metadata"]["annotations"][ANNOTATION_RESTARTS] == "1"
    assert run["restarts"] == 1
    assert operator.metric("dlm_operator_runs_preempted_total") >= 1
    assert operator.metric("dlm_operator_jobs_recreated_total") >= 1


def test_cancel_suspends_the_jobs_frees_the_gpus_and_keeps_the_experiment(experiments, operator):
    experiments.create("stop", spec(arms=["diffusion", "autoregressive"]))
    for run in ("stop-dlm", "stop-ar"):
        experiments.wait_run("stop", run, "Running", check=operator.check_alive)
    experiments.annotate("stop", {ANNOTATION_CANCEL: "2026-11-29T20:00:00Z"})
    status = experiments.wait_phase("stop", "Cancelled", check=operator.check_alive)
    assert {r["phase"] for r in status["runs"]} == {"Cancelled"}
    for run in ("stop-dlm", "stop-ar"):
        assert experiments.job(run)["spec"]["runPolicy"]["suspend"] is True
        wait_until(f"{run}'s pods gone", lambda: not experiments.pods(run), check=operator.check_alive)
    assert experiments.get("stop")["metadata"]["name"] == "stop", "the experiment stays"


def test_a_spec_the_models_reject_is_marked_invalid_with_the_field_named(experiments, operator):
    experiments.create("local", spec(checkpoint={"uri": "/tmp/ckpt"}))
    status = experiments.wait_phase("local", "Invalid", check=operator.check_alive)
    (valid,) = [c for c in status["conditions"] if c["type"] == "Valid"]
    assert valid["status"] == "False" and "spec.checkpoint.uri" in valid["message"], valid
    assert not experiments.jobs("local")


def test_deleting_the_experiment_garbage_collects_its_jobs(experiments, operator):
    experiments.create("gone", spec(arms=["diffusion"]))
    wait_until("the job", lambda: experiments.jobs("gone"), check=operator.check_alive)
    experiments.custom.delete_namespaced_custom_object("dlmctl.io", "v1alpha1", experiments.namespace,
                                                       "experiments", "gone")
    wait_until("jobs garbage-collected", lambda: not experiments.jobs("gone"), timeout=90, check=operator.check_alive)


def test_operator_metrics_count_what_it_did(experiments, operator):
    before = operator.metric("dlm_operator_jobs_created_total")
    experiments.create("counted", spec(arms=["diffusion"], sweep={"data.epochs": [1, 2, 3]}))
    wait_until("3 jobs", lambda: len(experiments.jobs("counted")) == 3, check=operator.check_alive)
    wait_until("the counter", lambda: operator.metric("dlm_operator_jobs_created_total") - before == 3)
    text = operator.scrape()
    assert "dlm_operator_reconcile_duration_seconds_bucket" in text
    assert operator.metric("dlm_operator_reconcile_duration_seconds_count") > 0
