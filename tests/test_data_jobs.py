"""Data preparation on a cluster: an Experiment whose runs read an s3:// token cache gets one Kubernetes
Indexed Job per distinct preparation, created before its PyTorchJobs; the runs wait for it, fail with it,
and are cancelled with it. What the operator creates is what `dlmctl render` prints, and the API server
accepts it."""
from __future__ import annotations

import copy
import json
import re

import kopf
import pytest

from dlmctl.spec.settings import OperatorSettings
from dlmctl.operator.data_jobs import LABEL_DATA, summarize_data_job
from dlmctl.operator.jobs import ANNOTATION_CANCEL
from dlmctl.operator.metrics import OperatorMetrics
from dlmctl.operator.observe import summarize_job
from dlmctl.operator.reconcile import Reconciler
from dlmctl.operator.render import job_manifests
from dlmctl.spec import Run, experiment_from_dict

CACHE = "s3://tokens/cache"
SPEC = {
    "arms": ["diffusion", "autoregressive"], "model": {"preset": "nano"},
    "data": {"unique_tokens": 8192, "seq_len": 64, "cache": CACHE, "preparation": {"workers": 3, "cpu": "6"}},
    "checkpoint": {"uri": "s3://bucket/exp", "credentials_secret": "s3-credentials"},
    "sweep": {"data.unique_tokens": [8192, 16384]},
}


def experiment(name: str = "exp", **changes) -> dict:
    spec = copy.deepcopy(SPEC)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": name, "namespace": "ns", "uid": "exp-uid", "generation": 1}, "spec": spec}


def rendered(document: dict) -> tuple[list[dict], list[dict]]:
    objects = job_manifests(experiment_from_dict(copy.deepcopy(document)))
    return [o for o in objects if o["kind"] == "Job"], [o for o in objects if o["kind"] == "PyTorchJob"]


# ---- what render prints -------------------------------------------------------------------------------


def test_the_sweep_points_of_one_source_share_one_preparation_created_before_the_training_jobs():
    document = experiment(sweep={"data.unique_tokens": [8192, 16384], "data.seq_len": [64, 128],
                                 "data.packing": ["fixed", "per-epoch"], "seed": [1, 2]})
    objects = job_manifests(experiment_from_dict(document))
    assert [o["kind"] for o in objects] == ["Job"] + ["PyTorchJob"] * 32


def test_a_different_source_tokenizer_or_validation_size_is_another_preparation():
    for sweep in ({"data.tokenizer.vocab_size": [512, 1024]}, {"data.validation_tokens": [4096, 8192]},
                  {"data.train": ["s3://corpus/a", "s3://corpus/b"]}):
        jobs, training = rendered(experiment(sweep=sweep))
        assert len(jobs) == 2 and len(training) == 4, sweep
        assert len({j["metadata"]["name"] for j in jobs}) == 2


def test_without_an_s3_cache_there_is_nothing_to_prepare():
    for cache in (None, "/var/cache/tokens"):
        document = experiment()
        document["spec"]["data"]["cache"] = cache
        jobs, training = rendered(document)
        assert jobs == [] and len(training) == 4


def test_the_job_is_indexed_one_pod_per_worker_each_running_prepare_data_with_the_run_spec():
    (job,), training = rendered(experiment())
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (job["apiVersion"], spec["completionMode"], spec["completions"], spec["parallelism"]) == \
        ("batch/v1", "Indexed", 3, 3)
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "dlmctl.trainer", "prepare-data"]
    assert pod["restartPolicy"] == "Never"  # what a podFailurePolicy requires
    env = {e["name"]: e.get("value") for e in container["env"]}
    run = Run.model_validate_json(env["DLMCTL_RUN_SPEC"])
    assert run.spec.data.cache == CACHE and run.spec.data.preparation.workers == 3
    assert env["DLMCTL_DATA_WORKERS"] == "3"
    assert env["OMP_NUM_THREADS"] == env["RAYON_NUM_THREADS"] == "6"
    assert container["resources"]["limits"] == container["resources"]["requests"] == {"cpu": "6", "memory": "8Gi"}
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert container["image"] == training[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"][0]["image"]
    assert job["metadata"]["labels"]["dlmctl.io/experiment"] == "exp"
    assert job["spec"]["template"]["metadata"]["labels"][LABEL_DATA] == job["metadata"]["labels"][LABEL_DATA]


def test_a_users_mistake_fails_the_job_at_once_and_a_pod_taken_away_is_not_counted():
    (job,), _ = rendered(experiment())
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "prepare", "operator": "In", "values": [2]}} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert job["spec"]["backoffLimitPerIndex"] >= 1


def longest_valid_name(**changes) -> str:
    for length in range(63, 0, -1):
        name = ("a-long-experiment-name-" * 3)[:length].rstrip("-")
        try:
            experiment_from_dict(experiment(name, **changes))
            return name
        except ValueError:
            continue
    raise AssertionError("no name is valid")


def test_its_name_is_stable_and_its_pods_hostnames_are_dns_labels_for_any_experiment_name():
    one_run = {"arms": ["diffusion"], "sweep": {}}
    for name in ("exp", longest_valid_name(**one_run)):
        (first,), _ = rendered(experiment(name, **one_run))
        (again,), _ = rendered(experiment(name, **one_run))
        job_name = first["metadata"]["name"]
        assert job_name == again["metadata"]["name"]
        # Indexed pods get the hostname <job>-<index>: a DNS label (63 characters at most), index up to 1023
        hostname = f"{job_name}-1023"
        assert len(hostname) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", hostname), hostname
        assert job_name.startswith(name[:20])


@pytest.mark.cluster
def test_the_api_server_accepts_the_job(cluster, cluster_namespace):
    from kubernetes import client

    (job,), _ = rendered(experiment(sweep={"data.tokenizer.kind": ["byte"]}))
    job["metadata"]["namespace"] = cluster_namespace
    with cluster.api_client() as api:
        created = client.BatchV1Api(api).create_namespaced_job(cluster_namespace, job, dry_run="All")
    assert created.spec.completion_mode == "Indexed" and created.spec.completions == 3
    assert created.spec.pod_failure_policy.rules[0].action == "FailJob"


# ---- what the operator does ---------------------------------------------------------------------------


class RecordedJobs:
    def __init__(self):
        self.created, self.suspended_data = [], []

    def create(self, namespace, manifest):
        self.created.append(copy.deepcopy(manifest))
        return True

    def suspend_data_job(self, namespace, name):
        self.suspended_data.append(name)

    def suspend(self, namespace, name):
        pass


class NoProgress:
    def read(self, run):
        return None


def reconciler():
    jobs = RecordedJobs()
    config = OperatorSettings(restart_backoff=10, restart_backoff_max=300, metrics_port=0, health_port=0)
    return Reconciler(config, jobs, OperatorMetrics(), adopt=lambda child, owner: kopf.adopt(child, owner=owner),
                      progress=NoProgress(), clock=lambda: 1000.0), jobs


def data_job(manifest: dict, **status) -> dict:
    body = copy.deepcopy(manifest)
    body["metadata"]["uid"] = "data-uid"
    body["status"] = status
    return summarize_data_job(body)


def look(r, body, data_jobs=(), jobs=()):
    status = r.reconcile(body, list(jobs), [], list(data_jobs))
    if status is not None:
        body["status"] = status
    return body["status"]


def created_kinds(jobs: RecordedJobs) -> list[str]:
    return [m["kind"] for m in jobs.created]


def test_the_runs_wait_for_their_data_and_their_jobs_are_created_once_it_is_ready():
    r, jobs = reconciler()
    body = experiment()
    status = look(r, body)
    assert created_kinds(jobs) == ["Job"], "only the preparation, no training job yet"
    (prepared,) = [m for m in jobs.created]
    expected, _ = rendered(experiment())
    prepared["metadata"].pop("ownerReferences")
    assert [prepared] == expected, "what the operator creates is what render prints"
    (data,) = status["data"]
    assert data["runs"] == [run["name"] for run in status["runs"]] and data["workers"] == 3
    assert {(run["phase"], run["reason"]) for run in status["runs"]} == {("Pending", "PreparingData")}

    status = look(r, body, [data_job(prepared, active=2, succeeded=1)])
    assert (status["data"][0]["phase"], status["data"][0]["completed"]) == ("Running", 1)
    assert created_kinds(jobs) == ["Job"]
    assert "1/3 pods done" in status["runs"][0]["message"]

    complete = data_job(prepared, succeeded=3, conditions=[{"type": "Complete", "status": "True"}])
    status = look(r, body, [complete])
    assert status["data"][0]["phase"] == "Succeeded" and status["data"][0]["completed"] == 3
    assert created_kinds(jobs) == ["Job"] + ["PyTorchJob"] * 4
    assert sorted(m["metadata"]["name"] for m in jobs.created[1:]) == sorted(run["name"] for run in status["runs"])

    training = [{**summarize_job({**m, "metadata": {**m["metadata"], "uid": f"uid-{i}"}}),
                 "run": m["metadata"]["name"]} for i, m in enumerate(jobs.created[1:])]
    look(r, body, [], training)  # the Job is deleted later (by hand, or a TTL): the data stays prepared
    assert created_kinds(jobs) == ["Job"] + ["PyTorchJob"] * 4
    assert body["status"]["data"][0]["phase"] == "Succeeded"


def test_a_failed_preparation_fails_every_run_that_reads_it_with_its_reason():
    r, jobs = reconciler()
    body = experiment()
    look(r, body)
    failed = data_job(jobs.created[0], failed=1, conditions=[{
        "type": "Failed", "status": "True", "reason": "PodFailurePolicy",
        "message": "Container prepare for pod ns/exp-data-0 failed with exit code 2 matching FailJob rule at index 0"}])
    status = look(r, body, [failed])
    assert status["data"][0]["phase"] == "Failed" and status["phase"] == "Failed"
    for run in status["runs"]:
        assert (run["phase"], run["reason"]) == ("Failed", "DataPreparationFailed")
        assert "exit code 2" in run["message"] and "kubectl logs -n ns -l dlmctl.io/data=" in run["message"]
    assert created_kinds(jobs) == ["Job"], "no training job for data that is not there"


def test_cancelling_suspends_the_preparation_and_cancels_the_waiting_runs():
    r, jobs = reconciler()
    body = experiment()
    look(r, body)
    running = data_job(jobs.created[0], active=3)
    look(r, body, [running])
    body["metadata"]["annotations"] = {ANNOTATION_CANCEL: "2026-12-07T00:00:00Z"}
    status = look(r, body, [running])
    assert jobs.suspended_data == [jobs.created[0]["metadata"]["name"]]
    assert status["data"][0]["phase"] == "Cancelled" and status["phase"] == "Cancelled"
    assert {run["phase"] for run in status["runs"]} == {"Cancelled"}


def test_a_changed_spec_creates_no_preparation():
    r, jobs = reconciler()
    body = experiment()
    body["metadata"]["generation"] = 2
    body["status"] = {"observedGeneration": 1}
    look(r, body)
    assert jobs.created == []


def test_the_status_the_operator_writes_is_an_experiment_status():
    from dlmctl.spec.experiment import ExperimentStatus

    r, jobs = reconciler()
    body = experiment()
    status = look(r, body)
    parsed = ExperimentStatus.model_validate(json.loads(json.dumps(status)))
    assert parsed.data[0].runs == [run.name for run in parsed.runs]


def test_get_shows_each_preparation_under_the_runs():
    from rich.console import Console

    from dlmctl.cli.output import status_table
    from dlmctl.spec.experiment import Experiment

    r, jobs = reconciler()
    body = experiment()
    look(r, body)
    status = look(r, body, [data_job(jobs.created[0], active=2, succeeded=1)])
    shown = Experiment.model_validate({**body, "status": json.loads(json.dumps(status))})
    console = Console(width=400, record=True)
    console.print(status_table(shown))
    text = console.export_text()
    name = jobs.created[0]["metadata"]["name"]
    assert f"data {name}: Running (1/3 pods done) tokenizing" in text
    assert text.count("PreparingData") == 4
