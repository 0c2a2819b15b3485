"""`dlmctl render`: exactly the PyTorchJobs a cluster would receive, one per run, built with the kubeflow-training models."""
import json
from pathlib import Path

import pytest
import yaml
from kubeflow.training import models
from kubeflow.training.api_client import ApiClient

from dlmctl.cli.app import main
from dlmctl.cli.render import pytorch_jobs, render_yaml, to_dicts
from dlmctl.spec import Run, experiment_from_dict, load_experiment

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
SWEEP = ROOT / "examples" / "scarcity-sweep.yaml"


def jobs(path=QUICKSTART) -> list[dict]:
    return to_dicts(pytorch_jobs(load_experiment(path)))


def job_for(**spec) -> dict:
    exp = experiment_from_dict({"metadata": {"name": "exp", "labels": {"team": "lm"}}, "spec": {"arms": ["diffusion"], **spec}})
    return to_dicts(pytorch_jobs(exp))[0]


def container(job: dict, replica: str = "Master") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]


def test_one_pytorchjob_per_run_named_after_the_run():
    rendered = jobs(SWEEP)
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
    replicas = jobs(SWEEP)[0]["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]


def test_the_container_runs_torchrun_with_the_rendezvous_the_operator_injects():
    job = jobs(SWEEP)[0]
    assert job["spec"]["nprocPerNode"] == "8"
    c = container(job)
    assert c["name"] == "pytorch" and c["image"] == "ghcr.io/dlmctl/trainer:0.1.0"
    assert c["command"][:6] == [
        "torchrun", "--nnodes=$(PET_NNODES)", "--nproc-per-node=$(PET_NPROC_PER_NODE)", "--node-rank=$(PET_NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
    ]
    assert c["command"][6:8] == ["-m", "dlmctl.trainer"]
    assert {"name": "pytorchjob-port", "containerPort": 23456} in c["ports"]


def test_the_run_travels_as_json_in_the_environment():
    exp = load_experiment(SWEEP)
    for run, job in zip(exp.runs(), jobs(SWEEP)):
        env = {e["name"]: e["value"] for e in container(job)["env"]}
        assert Run.model_validate_json(env["DLMCTL_RUN_SPEC"]) == run


def test_resources_request_cpu_memory_and_gpus():
    assert container(jobs(SWEEP)[0])["resources"] == {
        "limits": {"cpu": "96", "memory": "1500Gi", "nvidia.com/gpu": "8"},
        "requests": {"cpu": "96", "memory": "1500Gi", "nvidia.com/gpu": "8"},
    }
    assert "nvidia.com/gpu" not in container(jobs()[0])["resources"]["limits"]


def test_s3_credentials_are_only_a_secret_reference():
    job = jobs(SWEEP)[0]
    assert container(job)["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    names = {e["name"] for e in container(job)["env"]}
    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "envFrom" not in container(jobs()[0])


def test_run_policy_and_scheduling_policy_come_from_spec_scheduling():
    assert jobs(SWEEP)[0]["spec"]["runPolicy"] == {
        "backoffLimit": 20, "cleanPodPolicy": "None",
        "schedulingPolicy": {"priorityClass": "preemptible", "queue": "research"},
    }
    assert jobs()[0]["spec"]["runPolicy"] == {"backoffLimit": 3, "cleanPodPolicy": "None"}


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
    for document in yaml.safe_load_all(render_yaml(load_experiment(SWEEP))):
        job = client.deserialize(Response(document), "KubeflowOrgV1PyTorchJob")
        assert isinstance(job, models.KubeflowOrgV1PyTorchJob)
        assert isinstance(job.spec.pytorch_replica_specs["Master"].template, models.V1PodTemplateSpec)
        assert client.sanitize_for_serialization(job) == document


def pytorchjob_crd_schema():
    try:
        from testenv.versions import TRAINING_OPERATOR
    except ImportError:
        TRAINING_OPERATOR = "v1.9.3"
    crd = (Path.home() / "go/pkg/mod/github.com/kubeflow" / f"training-operator@{TRAINING_OPERATOR}"
           / "manifests/base/crds/kubeflow.org_pytorchjobs.yaml")
    if not crd.is_file():
        pytest.skip(f"the training-operator CRD is not in the Go module cache ({crd})")
    return yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", [QUICKSTART, SWEEP], ids=["quickstart", "scarcity-sweep"])
def test_rendered_jobs_are_valid_for_the_pytorchjob_crd(path):
    from openapi_check import validate

    schema = pytorchjob_crd_schema()
    for document in jobs(path):
        assert validate(document, schema) == [], document["metadata"]["name"]


def test_render_command_prints_multi_document_yaml(capsys):
    assert main(["render", str(QUICKSTART)]) == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == jobs()


def test_render_command_json_is_a_kubernetes_list(capsys):
    assert main(["render", str(QUICKSTART), "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (listed["kind"], listed["items"]) == ("List", jobs())


def test_render_reads_standard_input(capsys, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(QUICKSTART.read_bytes())))
    assert main(["render", "-"]) == 0
    assert len(list(yaml.safe_load_all(capsys.readouterr().out))) == 2
