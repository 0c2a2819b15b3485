"""`dlmctl render`: exactly the PyTorchJobs a cluster would receive, one per run, built with the kubeflow-training
models, and accepted by a real API server and the training-operator's validating webhook."""
import copy
import json
import math
import time
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from kubeflow.training import models
from kubeflow.training.api_client import ApiClient

from dlmctl.cli.app import main
from dlmctl.operator.jobs import JOB_GROUP, JOB_PLURAL, JOB_VERSION
from dlmctl.operator.render import job_manifests, render_yaml
from dlmctl.spec import Run, experiment_from_dict, load_experiment, parse_yaml
from dlmctl.spec.sections import DEFAULT_IMAGE

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
SWEEP = ROOT / "examples" / "scarcity-sweep.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
S3_URI = "s3://bucket/x"


def document(path: Path) -> dict:
    return parse_yaml(path.read_text())


def quickstart_on_s3() -> dict:
    """The quickstart as a cluster runs it: checkpoints (and metrics) on S3."""
    doc = document(QUICKSTART)
    doc["spec"]["checkpoint"]["uri"] = S3_URI
    return doc


def jobs(doc: dict | None = None) -> list[dict]:
    return job_manifests(experiment_from_dict(copy.deepcopy(doc or quickstart_on_s3())))


def sweep_jobs() -> list[dict]:
    return job_manifests(load_experiment(SWEEP))


def job_for(**spec) -> dict:
    exp = experiment_from_dict({"metadata": {"name": "exp", "labels": {"team": "lm"}},
                                "spec": {"arms": ["diffusion"], "checkpoint": {"uri": S3_URI}, **spec}})
    return job_manifests(exp)[0]


def container(job: dict, replica: str = "Master") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]


def test_one_pytorchjob_per_run_named_after_the_run():
    rendered = sweep_jobs()
    assert [(j["apiVersion"], j["kind"]) for j in rendered] == [("kubeflow.org/v1", "PyTorchJob")] * 12
    assert [j["metadata"]["name"] for j in rendered] == [r.name for r in load_experiment(SWEEP).runs()]


def test_jobs_and_pods_are_labelled_with_experiment_run_and_arm():
    job = jobs()[1]
    labels = {"dlmctl.io/experiment": "quickstart", "dlmctl.io/run": "quickstart-ar", "dlmctl.io/arm": "autoregressive"}
    assert job["metadata"]["labels"] == labels
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"] == labels
    assert job_for()["metadata"]["labels"]["team"] == "lm", "the experiment's own labels are kept"


def test_one_node_is_a_lone_master_and_more_nodes_add_workers():
    assert list(jobs()[0]["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    replicas = sweep_jobs()[0]["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]


def test_the_container_runs_torchrun_with_the_rendezvous_the_operator_injects():
    job = sweep_jobs()[0]
    assert job["spec"]["nprocPerNode"] == "8"
    c = container(job)
    assert c["name"] == "pytorch" and c["image"] == DEFAULT_IMAGE
    assert c["command"][:6] == [
        "torchrun", "--nnodes=$(PET_NNODES)", "--nproc-per-node=$(PET_NPROC_PER_NODE)", "--node-rank=$(PET_NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
    ]
    assert c["command"][6:8] == ["-m", "dlmctl.trainer"]
    assert {"name": "pytorchjob-port", "containerPort": 23456} in c["ports"]


def test_the_run_travels_as_json_in_the_environment():
    exp = load_experiment(SWEEP)
    for run, job in zip(exp.runs(), sweep_jobs()):
        env = {e["name"]: e["value"] for e in container(job)["env"]}
        assert Run.model_validate_json(env["DLMCTL_RUN_SPEC"]) == run


def test_cpu_and_memory_follow_the_gpus_unless_the_spec_sets_them():
    eight_gpus = {"cpu": "80", "memory": "800Gi", "nvidia.com/gpu": "8"}  # fits a 96-core, 1Ti, 8-GPU node
    assert container(sweep_jobs()[0])["resources"] == {"limits": eight_gpus, "requests": eight_gpus}
    one_gpu = {"cpu": "10", "memory": "100Gi", "nvidia.com/gpu": "1"}
    assert container(job_for(resources={"gpus_per_node": 1}))["resources"]["requests"] == one_gpu
    assert container(jobs()[0])["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}, "no GPUs: a small pod"
    explicit = job_for(resources={"gpus_per_node": 8, "cpu": "48", "memory": "500Gi"}, batch={"micro_batch_sequences": 4})
    assert container(explicit)["resources"]["requests"] == {"cpu": "48", "memory": "500Gi", "nvidia.com/gpu": "8"}


def cpus(quantity: str) -> Fraction:
    """A Kubernetes CPU quantity as the spec allows it (decimal cores, or millicores with `m`)."""
    return Fraction(quantity[:-1]) / 1000 if quantity.endswith("m") else Fraction(quantity)


@pytest.mark.parametrize("resources, cpu, procs", [
    ({"gpus_per_node": 8}, "80", 8),  # the default: 10 CPUs per GPU, a process per GPU
    ({"gpus_per_node": 8, "cpu": "48", "processes_per_node": 8}, "48", 8),
    ({"cpu": "7", "processes_per_node": 2}, "7", 2),
    ({"cpu": "2.5"}, "2.5", 1),
    ({"cpu": "1500m", "processes_per_node": 1}, "1500m", 1),
    ({"cpu": "500m"}, "500m", 1),  # less than a core: still one thread
    ({"gpus_per_node": 4, "cpu": "2"}, "2", 4),
])
def test_each_trainer_process_gets_its_share_of_the_pods_cpus_as_passive_openmp_threads(resources, cpu, procs):
    batch = {"micro_batch_sequences": 4} if procs > 1 else {}
    c = container(job_for(resources=resources, batch=batch))
    assert c["resources"]["limits"]["cpu"] == cpu and c["resources"]["requests"]["cpu"] == cpu
    threads = str(max(1, math.floor(cpus(cpu) / procs)))
    env = {e["name"]: e["value"] for e in c["env"]}
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"], env["OMP_WAIT_POLICY"]) == (threads, threads, "PASSIVE")


def test_s3_credentials_are_only_a_secret_reference():
    job = sweep_jobs()[0]
    assert container(job)["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    names = {e["name"] for e in container(job)["env"]}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "envFrom" not in container(jobs()[0])


def test_run_policy_leaves_restarts_to_the_dlmctl_operator():
    assert jobs()[0]["spec"]["runPolicy"] == {"cleanPodPolicy": "None"}


def test_a_queued_run_is_handed_to_kueue_suspended_so_it_is_admitted_whole():
    job = sweep_jobs()[0]  # spec.scheduling: queue research, priority_class preemptible
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "suspend": True}
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
    # no WorkloadPriorityClass known (render knows no cluster): Kueue takes the pods' PriorityClass
    assert "kueue.x-k8s.io/priority-class" not in job["metadata"]["labels"]
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["priorityClassName"] == "preemptible"
    # the queue is the job's, not its pods' (Kueue's pod integration would otherwise gate each pod alone)
    pod_labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in pod_labels)
    assert "suspend" not in jobs()[0]["spec"]["runPolicy"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in jobs()[0]["metadata"]["labels"])


def test_a_priority_class_names_a_kueue_workload_priority_class_where_the_cluster_has_one():
    experiment = load_experiment(SWEEP)
    (job, *_) = [j for j in job_manifests(experiment, frozenset({"preemptible"})) if j["kind"] == "PyTorchJob"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "preemptible"
    (job, *_) = [j for j in job_manifests(experiment, frozenset({"other"})) if j["kind"] == "PyTorchJob"]
    assert "kueue.x-k8s.io/priority-class" not in job["metadata"]["labels"]


def test_prometheus_scrapes_the_metrics_port_when_it_is_enabled():
    job = job_for(metrics={"port": 9400})
    template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9400", "prometheus.io/path": "/metrics",
    }
    assert {"name": "metrics", "containerPort": 9400} in container(job)["ports"]
    assert "annotations" not in jobs()[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]


def test_rendered_yaml_round_trips_through_the_kubeflow_training_models():
    class Response:  # what ApiClient.deserialize reads
        def __init__(self, document):
            self.data = json.dumps(document)

    client = ApiClient()
    for doc in yaml.safe_load_all(render_yaml(load_experiment(SWEEP))):
        job = client.deserialize(Response(doc), "KubeflowOrgV1PyTorchJob")
        assert isinstance(job, models.KubeflowOrgV1PyTorchJob)
        assert isinstance(job.spec.pytorch_replica_specs["Master"].template, models.V1PodTemplateSpec)
        assert client.sanitize_for_serialization(job) == doc


# ---- the command ---------------------------------------------------------------------------------

@pytest.fixture
def quickstart_file(tmp_path) -> Path:
    path = tmp_path / "quickstart-s3.yaml"
    path.write_text(yaml.safe_dump(quickstart_on_s3()))
    return path


def test_render_command_prints_multi_document_yaml(capsys, quickstart_file):
    assert main(["render", str(quickstart_file)]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == jobs()


def test_render_command_json_is_a_kubernetes_list(capsys, quickstart_file):
    assert main(["render", str(quickstart_file), "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (listed["kind"], listed["items"]) == ("List", jobs())


def test_render_reads_standard_input(capsys, monkeypatch, quickstart_file):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(quickstart_file.read_bytes())))
    assert main(["render", "-"]) == 0
    assert len(list(yaml.safe_load_all(capsys.readouterr().out))) == 2


def test_render_refuses_a_spec_without_an_s3_checkpoint_uri(capsys):
    assert main(["render", str(QUICKSTART)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "spec.checkpoint.uri: a cluster run needs an s3:// URI" in captured.err


# ---- a real API server and the training-operator's webhook ------------------------------------------

CLUSTER_SPECS = {"quickstart-on-s3": quickstart_on_s3()} | {
    path.name: document(path) for path in EXAMPLES
    if str(document(path)["spec"].get("checkpoint", {}).get("uri", "")).startswith("s3://")
}


def test_the_cluster_specs_include_every_example_with_an_s3_checkpoint():
    assert "scarcity-sweep.yaml" in CLUSTER_SPECS


@pytest.mark.cluster
@pytest.mark.parametrize("name", sorted(CLUSTER_SPECS))
def test_every_rendered_job_is_accepted_by_the_api_server_and_the_training_operator_webhook(
        cluster, cluster_namespace, name):
    from kubernetes import client

    with cluster.api_client() as api:
        objects = client.CustomObjectsApi(api)
        for job in jobs(CLUSTER_SPECS[name]):
            job["metadata"]["namespace"] = cluster_namespace
            created = objects.create_namespaced_custom_object(
                JOB_GROUP, JOB_VERSION, cluster_namespace, JOB_PLURAL, job, dry_run="All")
            assert created["spec"]["pytorchReplicaSpecs"].keys() == job["spec"]["pytorchReplicaSpecs"].keys()


@pytest.mark.cluster
def test_the_sweeps_pods_fit_the_gpu_nodes_they_ask_for(cluster, cluster_namespace):
    """Four pods of 8 GPUs, 80 CPUs and 800Gi each are placed on four 8-GPU, 96-core, 1Ti nodes."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    (job, *_) = sweep_jobs()
    job["metadata"]["namespace"] = cluster_namespace
    del job["spec"]["runPolicy"]["suspend"], job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]  # placed, not queued
    with cluster.api_client() as api:
        try:
            client.SchedulingV1Api(api).create_priority_class(
                client.V1PriorityClass(metadata=client.V1ObjectMeta(name="preemptible"), value=0))
        except ApiException as err:
            if err.status != 409:
                raise
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            JOB_GROUP, JOB_VERSION, cluster_namespace, JOB_PLURAL, job)
        core = client.CoreV1Api(api)
        selector = f"training.kubeflow.org/job-name={job['metadata']['name']}"
        deadline, placed = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            pods = core.list_namespaced_pod(cluster_namespace, label_selector=selector).items
            placed = sorted(p.spec.node_name for p in pods if p.spec.node_name)
            if len(placed) == 4:
                break
            time.sleep(0.5)
        unscheduled = [c.message for p in pods for c in (p.status.conditions or []) if c.reason == "Unschedulable"]
        assert len(set(placed)) == 4, f"placed on {placed}; unschedulable: {unscheduled}"
