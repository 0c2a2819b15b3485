"""The generated Experiment CRD on a real API server (tests/testenv): it accepts every example, refuses what the
models refuse and names the field, keeps a submitted spec as it was, and what it hands back is a valid spec again.

Every case is also put to `experiment_from_dict`, so the CRD and the models cannot drift apart unnoticed.
"""
from __future__ import annotations

import copy
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from dlmctl.spec import GROUP, PLURAL, VERSION, ExperimentStatus, SpecError, experiment_from_dict, parse_yaml
from dlmctl.spec.contracts import ExperimentPhase, RunPhase
from dlmctl.spec.crd import CRD_NAME, crd
from dlmctl.spec.experiment import IMMUTABLE_SPEC, SWEEP_KEYS

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))


@pytest.fixture(scope="module")
def experiments(cluster):
    """The CustomObjectsApi, with the generated CRD installed (pyproject's `testenv_crds` installs it at start-up)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with cluster.api_client() as api:
        crds = client.ApiextensionsV1Api(api)
        try:
            installed = json.loads(crds.read_custom_resource_definition(CRD_NAME, _preload_content=False).data)
        except ApiException as err:
            if err.status != 404:
                raise
            installed = None  # an external cluster (DLMCTL_TEST_KUBECONFIG) without it
        generated = crd()
        if installed is None:
            crds.create_custom_resource_definition(generated)
        elif any(installed["spec"].get(key) != value for key, value in generated["spec"].items()):
            generated["metadata"]["resourceVersion"] = installed["metadata"]["resourceVersion"]
            crds.replace_custom_resource_definition(CRD_NAME, generated)
        else:
            generated = None
        if generated is not None:
            _wait_established(crds)
        yield client.CustomObjectsApi(api)


def _wait_established(crds, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(crds.read_custom_resource_definition(CRD_NAME, _preload_content=False).data).get("status", {})
        if {c["type"]: c["status"] for c in status.get("conditions", [])}.get("Established") == "True":
            time.sleep(1)  # the new schema reaches the handlers just after Established
            return
        time.sleep(0.2)
    pytest.fail(f"{CRD_NAME} not Established after {timeout}s")


def create(experiments, namespace: str, document: dict, dry_run: bool = True) -> dict:
    return experiments.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, document, dry_run="All" if dry_run else None)


def refused_by_server(experiments, namespace: str, document: dict) -> str:
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as caught:
        create(experiments, namespace, document)
    assert caught.value.status == 422, caught.value.body
    return json.loads(caught.value.body)["message"]


def refused_by_models(document: dict) -> str:
    with pytest.raises(SpecError) as caught:
        experiment_from_dict(copy.deepcopy(document))
    return str(caught.value)


def quickstart(name: str = "qs", **spec) -> dict:
    document = parse_yaml((ROOT / "examples" / "quickstart.yaml").read_text())
    document["metadata"]["name"] = name
    _merge(document["spec"], spec)
    return document


def _merge(into: dict, patch: dict) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


# ---- the CRD itself ---------------------------------------------------------------------------------------

def test_the_api_server_serves_the_generated_crd(experiments, cluster):
    from kubernetes import client

    with cluster.api_client() as api:
        served = json.loads(client.ApiextensionsV1Api(api).read_custom_resource_definition(
            CRD_NAME, _preload_content=False).data)
    assert served["spec"]["versions"] == crd()["spec"]["versions"], "a structural schema, CEL rules compiled and in budget"
    assert {c["type"]: c["status"] for c in served["status"]["conditions"]}["Established"] == "True"


# ---- what it accepts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_accepted_as_written(experiments, cluster_namespace, path):
    document = parse_yaml(path.read_text())
    experiment_from_dict(copy.deepcopy(document))
    created = create(experiments, cluster_namespace, document)
    assert created["spec"] == document["spec"], "nothing pruned"


@pytest.mark.parametrize(
    "spec",
    [
        {"seed": 2**53 - 1},
        {"model": {"preset": None, "n_layer": 2, "d_model": 64, "n_head": 4, "d_ff": 128}},
        {"batch": {"global_sequences": None, "global_tokens": 4096, "micro_batch_sequences": 8}},
        {"resources": {"nodes": 2, "gpus_per_node": 8, "processes_per_node": 2}, "batch": {"micro_batch_sequences": 8}},
        {"resources": {"nodes": 2, "gpus_per_node": 8}, "batch": {"global_sequences": 64, "micro_batch_sequences": 4}},
        {"data": {"tokenizer": {"kind": "file", "path": "tokenizer.json"}}},
        {"schedule": {"kind": "cosine", "warmup_fraction": 0.5, "decay_fraction": 0.6}},
        {"checkpoint": {"uri": "s3://bucket/prefix"}},
        {"sweep": {"optimizer.betas": [[0.9, 0.95], [0.9, 0.99]], "model.preset": ["nano", "micro"],
                   "data.tokenizer.vocab_size": [512, 1024], "model.n_layer": [None, 2]}},
        {"data": {"total_tokens": 32768 * 32}, "sweep": {"data.unique_tokens": [32768, 65536]}},
    ],
    ids=["largest-seed", "custom-shape", "global-tokens", "processes-per-node", "gpus-make-the-world",
         "tokenizer-file", "cosine-ignores-decay", "s3-checkpoint", "sweeps", "fixed-total-tokens"],
)
def test_valid_specs_are_accepted_by_both(experiments, cluster_namespace, spec):
    document = quickstart(**spec)
    experiment_from_dict(copy.deepcopy(document))
    create(experiments, cluster_namespace, document)


# ---- what it refuses: the same specs the models refuse, naming the same field ------------------------------

REFUSED = {
    "unknown-preset": ({"model": {"preset": "huge"}},
                       ["spec.model.preset: unknown preset 'huge'; choose one of nano, micro, mini, 110m"]),
    "duplicate-arms": ({"arms": ["diffusion", "diffusion"]}, ["spec.arms: each arm may be listed once"]),
    "batch-over-micro-batches": (
        {"batch": {"global_sequences": 30, "micro_batch_sequences": 8}},
        ["spec.batch: global batch of 30 sequences is not divisible by micro_batch_sequences (8) x world size (1)"]),
    "batch-over-nodes": (
        {"resources": {"nodes": 3}},
        ["spec.batch: global batch of 32 sequences is not divisible by micro_batch_sequences (16) x world size (3)"]),
    "batch-over-gpus": (
        {"resources": {"nodes": 2, "gpus_per_node": 8}, "batch": {"global_sequences": 64, "micro_batch_sequences": 8}},
        ["spec.batch: global batch of 64 sequences is not divisible by micro_batch_sequences (8) x world size (16)"]),
    "batch-over-processes": (
        {"resources": {"gpus_per_node": 8, "processes_per_node": 3}},
        ["spec.batch: global batch of 32 sequences is not divisible by micro_batch_sequences (16) x world size (3)"]),
    "batch-in-tokens": (
        {"batch": {"global_sequences": None, "global_tokens": 128 * 24}},
        ["spec.batch: global batch of 24 sequences is not divisible by micro_batch_sequences (16) x world size (1)"]),
    "both-batch-sizes": ({"batch": {"global_tokens": 4096}},
                         ["spec.batch: set global_sequences or global_tokens, not both"]),
    "global-tokens-not-whole-sequences": ({"batch": {"global_sequences": None, "global_tokens": 4000}},
                                          ["spec.batch.global_tokens: 4000 is not a multiple of seq_len (128)"]),
    "sweep-over-an-unknown-field": ({"sweep": {"data.epoch": [1, 2]}}, ["spec.sweep", SWEEP_KEYS]),
    "sweep-over-a-section": ({"sweep": {"data.tokenizer": [{"kind": "byte"}]}}, ["spec.sweep", SWEEP_KEYS]),
    "sweep-over-arms": ({"sweep": {"arms": [["diffusion"]]}}, ["spec.sweep", "arms", "cannot be swept"]),
    "sweep-over-sweep": ({"sweep": {"sweep": [{}]}}, ["spec.sweep", "sweep cannot be swept"]),
    "sweep-value-out-of-range": ({"sweep": {"data.epochs": [1, 0]}}, ["spec.sweep", "data.epochs"]),
    "sweep-value-of-the-wrong-type": ({"sweep": {"data.seq_len": [128, "long"]}}, ["spec.sweep", "data.seq_len"]),
    "unique-tokens-below-one-sequence": ({"data": {"unique_tokens": 100}},
                                         ["spec.data.unique_tokens: 100 is less than one sequence (seq_len=128)"]),
    "schedule-phases": ({"schedule": {"warmup_fraction": 0.5, "decay_fraction": 0.6}},
                        ["spec.schedule: warmup_fraction + decay_fraction must be <= 1"]),
    "tokenizer-file-without-path": ({"data": {"tokenizer": {"kind": "file"}}},
                                    ["spec.data.tokenizer.path: required when kind is 'file'"]),
    "tokenizer-path-without-file": ({"data": {"tokenizer": {"path": "tokenizer.json"}}},
                                    ["spec.data.tokenizer.path: only allowed when kind is 'file'"]),
    "checkpoint-uri-scheme": ({"checkpoint": {"uri": "gs://bucket/x"}},
                              ["spec.checkpoint.uri: 'gs://bucket/x': only s3:// and local paths are supported"]),
    "beta-out-of-range": ({"optimizer": {"betas": [0.9, 1.0]}}, ["spec.optimizer.betas"]),
    "epochs-out-of-range": ({"data": {"epochs": 0}}, ["spec.data.epochs"]),
    "seed-out-of-range": ({"seed": 2**53}, ["spec.seed"]),
    "arm-unknown": ({"arms": ["transformer"]}, ["spec.arms"]),
    "epochs-disagree-with-total-tokens": ({"data": {"total_tokens": 10**6}},
                                          ["spec.data.epochs: ", "disagrees with total_tokens / unique_tokens"]),
    "sampled-weight-without-eps": ({"objective": {"diffusion": {"loss_weight": "sampled"}}},
                                   ["spec.objective.diffusion.loss_weight: 'sampled' needs eps > 0"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_api_server_refuses_what_the_models_refuse_naming_the_field(experiments, cluster_namespace, case):
    spec, fragments = REFUSED[case]
    document = quickstart(**copy.deepcopy(spec))
    by_models = refused_by_models(document)
    by_server = refused_by_server(experiments, cluster_namespace, document)
    for fragment in fragments:
        assert fragment in by_models, by_models
        assert fragment in by_server, by_server


@pytest.mark.parametrize("name, fragment", [
    ("exp.v1", "metadata.name: 'exp.v1' is not a valid Kubernetes name"),
    ("a" * 64, "metadata.name: must have at most 63 characters"),
])
def test_the_name_is_a_dns_label_for_both(experiments, cluster_namespace, name, fragment):
    """The API server allows a custom resource a DNS subdomain for a name; runs need a DNS label."""
    document = quickstart(name)
    assert fragment in refused_by_models(document)
    assert fragment in refused_by_server(experiments, cluster_namespace, document)


# ---- what it hands back ---------------------------------------------------------------------------------------

def operator_status(observed_generation: int) -> dict:
    """A status as the operator writes it, every field set."""
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    runs = [
        {"name": "qs-dlm", "arm": "diffusion", "phase": RunPhase.Running, "reason": "Training", "step": 120,
         "total_steps": 256, "epoch": 15.0, "tokens": 491520, "train_loss": 5.25, "val_loss": 5.5,
         "val_loss_stderr": 0.03, "choice_accuracy": 0.25, "unigram_entropy": 5.8,
         "last_checkpoint": "s3://bucket/x/qs-dlm/step-000064", "restarts": 1,
         "message": "resumed from step 64 after a preemption", "startTime": started},
        {"name": "qs-ar", "arm": "autoregressive", "phase": RunPhase.Succeeded, "reason": "Completed", "step": 256,
         "total_steps": 256, "epoch": 32.0, "tokens": 1048576, "train_loss": 0.05, "val_loss": 6.675,
         "startTime": started, "completionTime": started},
    ]
    status = ExperimentStatus.model_validate({
        "phase": ExperimentPhase.Running, "observedGeneration": observed_generation, "runs": runs,
        "conditions": [{"type": "Ready", "status": "False", "reason": "RunsInProgress", "message": "1/2 runs done",
                        "lastTransitionTime": started}],
        "progress": "1/2", "startTime": started,
    })
    return status.model_dump(mode="json", exclude_none=True)


def test_an_experiment_read_back_from_the_server_is_a_valid_spec(experiments, cluster, cluster_namespace):
    from kubernetes import client

    document = quickstart(checkpoint={"uri": "s3://bucket/x"})
    document["metadata"].update(labels={"team": "lm"}, annotations={"note": "first try"})
    created = create(experiments, cluster_namespace, document, dry_run=False)
    name = document["metadata"]["name"]
    with cluster.api_client() as api:
        owner = client.CoreV1Api(api).create_namespaced_config_map(
            cluster_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    controllers_metadata = {"metadata": {
        "finalizers": ["dlmctl.io/runs"],
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}],
        "annotations": {"kopf.zalando.org/last-handled-configuration": json.dumps({"spec": document["spec"]}),
                        "dlmctl.io/cancel-requested": "2026-01-02T03:04:05Z"},
    }}
    experiments.patch_namespaced_custom_object(GROUP, VERSION, cluster_namespace, PLURAL, name, controllers_metadata)
    status = operator_status(created["metadata"]["generation"])
    experiments.patch_namespaced_custom_object_status(GROUP, VERSION, cluster_namespace, PLURAL, name, {"status": status})
    experiments.delete_namespaced_custom_object(GROUP, VERSION, cluster_namespace, PLURAL, name)  # held by the finalizer
    try:
        read = experiments.get_namespaced_custom_object(GROUP, VERSION, cluster_namespace, PLURAL, name)
        assert {"uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "finalizers",
                "ownerReferences", "deletionTimestamp", "deletionGracePeriodSeconds"} <= read["metadata"].keys()
        assert read["status"] == status, "the status schema keeps every field the operator writes"

        experiment = experiment_from_dict(read)
        assert experiment.status == ExperimentStatus.model_validate(status)
        assert experiment.spec == experiment_from_dict(copy.deepcopy(document)).spec
        assert experiment.metadata.model_dump(exclude_none=True) == {
            "name": name, "namespace": cluster_namespace, "labels": {"team": "lm"},
            "annotations": {"note": "first try", **controllers_metadata["metadata"]["annotations"]}}
        assert [r.name for r in experiment.runs()] == ["qs-dlm", "qs-ar"]
    finally:
        experiments.patch_namespaced_custom_object(
            GROUP, VERSION, cluster_namespace, PLURAL, name, {"metadata": {"finalizers": None}})


def test_a_metadata_typo_in_a_read_back_experiment_is_still_an_error(experiments, cluster_namespace):
    document = quickstart()
    read = create(experiments, cluster_namespace, document)  # dry run: uid, creationTimestamp, managedFields ...
    assert "uid" in read["metadata"]
    experiment_from_dict(read)
    read["metadata"]["lables"] = {"team": "lm"}
    assert "metadata.lables: unknown field" in refused_by_models(read)


def test_the_spec_cannot_change_once_submitted(experiments, cluster_namespace):
    from kubernetes.client.rest import ApiException

    document = quickstart(sweep={"data.epochs": [16, 32]})
    create(experiments, cluster_namespace, document, dry_run=False)
    name = document["metadata"]["name"]

    def patch(body: dict):
        return experiments.patch_namespaced_custom_object(GROUP, VERSION, cluster_namespace, PLURAL, name, body)

    for change in ({"data": {"epochs": 8}}, {"sweep": {"data.epochs": [16, 64]}}, {"arms": ["diffusion"]}):
        with pytest.raises(ApiException) as caught:
            patch({"spec": change})
        assert caught.value.status == 422, caught.value.body
        assert IMMUTABLE_SPEC in json.loads(caught.value.body)["message"]
    patch({"metadata": {"labels": {"team": "lm"}}})  # metadata and status stay writable
    experiments.patch_namespaced_custom_object_status(
        GROUP, VERSION, cluster_namespace, PLURAL, name, {"status": operator_status(1)})
    assert experiments.get_namespaced_custom_object(GROUP, VERSION, cluster_namespace, PLURAL, name)["spec"] == document["spec"]
