"""The Experiment spec: what is accepted, what is refused (with one line naming the field), how it expands into runs."""
from pathlib import Path

import pytest
import yaml

from dlmctl.spec import Experiment, Run, SpecError, experiment_from_dict, load_experiment, parse_yaml
from dlmctl.spec.experiment import SWEEPABLE

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def experiment(name: str = "exp", **spec) -> dict:
    return {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name}, "spec": spec}


def refused(document) -> str:
    with pytest.raises(SpecError) as caught:
        experiment_from_dict(document)
    message = str(caught.value)
    assert "\n" not in message, "a spec error is one line"
    return message


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_are_valid_and_expand_into_runs(path):
    exp = load_experiment(path)
    assert exp.runs()


def test_an_empty_spec_means_both_arms_with_defaults():
    exp = experiment_from_dict(experiment("tiny"))
    assert [(r.name, r.arm.value) for r in exp.runs()] == [("tiny-dlm", "diffusion"), ("tiny-ar", "autoregressive")]


# ---- ranges and types -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec, message",
    [
        ({"data": {"epochs": 0}}, "spec.data.epochs: must be > 0"),
        ({"data": {"epochs": -3}}, "spec.data.epochs: must be > 0"),
        ({"data": {"epochs": 1e9}}, "spec.data.epochs: must be <= 100000"),
        ({"data": {"unique_tokens": 10**15}}, "spec.data.unique_tokens: must be <= 10000000000000"),
        ({"seed": -1}, "spec.seed: must be >= 0"),
        ({"resources": {"nodes": 0}}, "spec.resources.nodes: must be >= 1"),
        ({"resources": {"gpus_per_node": 1000}}, "spec.resources.gpus_per_node: must be <= 64"),
        ({"optimizer": {"lr": 100}}, "spec.optimizer.lr: must be <= 10"),
        ({"optimizer": {"betas": [1.0, 0.9]}}, "spec.optimizer.betas.0: must be < 1"),
        ({"seed": 2**53}, "spec.seed: must be <= 9007199254740991"),
        ({"arms": ["diffusion", "autoregressive", "diffusion"]}, "spec.arms: must have at most 2 items"),
        ({"model": {"dropout": 1.0}}, "spec.model.dropout: must be < 1"),
        ({"data": {"tokenizer": {"vocab_size": 10}}}, "spec.data.tokenizer.vocab_size: must be >= 260"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory: 'lots' is not a positive memory quantity"),
    ],
)
def test_out_of_range_values_name_the_field_and_the_bound(spec, message):
    assert message in refused(experiment(**spec))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"data": {"epochs": "many"}}, "spec.data.epochs: must be a number"),
        ({"seed": 1.5}, "spec.seed: must be a whole number"),
        ({"arms": "diffusion"}, "spec.arms: must be a list"),
        ({"arms": ["transformer"]}, "spec.arms.0: must be one of"),
        ({"model": 3}, "spec.model: must be a mapping"),
        ({"precision": "fp8"}, "spec.precision: must be one of"),
    ],
)
def test_wrong_types_name_the_field(spec, message):
    assert message in refused(experiment(**spec))


@pytest.mark.parametrize(
    "document, message",
    [
        (experiment(bogus=1), "spec.bogus: unknown field"),
        (experiment(data={"epoch": 4}), "spec.data.epoch: unknown field"),
        (experiment(data={"tokenizer": {"size": 4}}), "spec.data.tokenizer.size: unknown field"),
        ({**experiment(), "extra": 1}, "extra: unknown field"),
        ({**experiment(), "apiVersion": "dlmctl.io/v1"}, "apiVersion: must be one of 'dlmctl.io/v1alpha1'"),
        ({**experiment(), "kind": "Job"}, "kind: must be one of 'Experiment'"),
        ({**experiment(), "metadata": {}}, "metadata.name: required field is missing"),
    ],
)
def test_unknown_fields_and_wrong_resource_headers_are_refused(document, message):
    assert message in refused(document)


# ---- cross-field rules ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec, message",
    [
        ({"batch": {"global_sequences": 30, "micro_batch_sequences": 8}},
         "spec.batch: global batch of 30 sequences is not divisible by micro_batch_sequences (8) x world size (1)"),
        ({"batch": {"global_sequences": 32, "micro_batch_sequences": 8}, "resources": {"nodes": 3}},
         "x world size (3)"),
        ({"batch": {"global_sequences": 32, "global_tokens": 8192}}, "spec.batch: set global_sequences or global_tokens, not both"),
        ({"data": {"unique_tokens": 100, "seq_len": 256}}, "spec.data.unique_tokens: 100 is less than one sequence (seq_len=256)"),
        ({"model": {"preset": None, "n_layer": 2}}, "spec.model: without a preset, d_model, n_head, d_ff must be set"),
        ({"model": {"preset": "huge"}}, "spec.model.preset: unknown preset 'huge'"),
        ({"model": {"d_model": 100, "n_head": 3}}, "spec.model: d_model (100) must be divisible by n_head (3)"),
        ({"model": {"n_head": 8, "n_kv_head": 3}}, "spec.model: n_head (8) must be divisible by n_kv_head (3)"),
        ({"schedule": {"warmup_fraction": 0.5, "decay_fraction": 0.6}}, "spec.schedule: warmup_fraction + decay_fraction must be <= 1"),
        ({"data": {"tokenizer": {"kind": "file"}}}, "spec.data.tokenizer.path: required when kind is 'file'"),
        ({"arms": ["diffusion", "diffusion"]}, "spec.arms: each arm may be listed once"),
        ({"data": {"unique_tokens": 1000, "seq_len": 8, "epochs": 3, "total_tokens": 64000}},
         "spec.data.epochs: 3 disagrees with total_tokens / unique_tokens = 64"),
        ({"objective": {"diffusion": {"loss_weight": "sampled", "eps": 0}}},
         "spec.objective.diffusion.loss_weight: 'sampled' needs eps > 0"),
    ],
)
def test_cross_field_rules(spec, message):
    assert message in refused(experiment(**spec))


# ---- sweep expansion ------------------------------------------------------------------------------

def test_a_sweep_expands_arms_times_the_grid_with_deterministic_names():
    exp = experiment_from_dict(experiment("scarce", sweep={"data.unique_tokens": [1_000_000, 2_000_000], "data.epochs": [1, 40]}))
    runs = exp.runs()
    assert [r.name for r in runs] == [
        "scarce-dlm-ut1m-e1", "scarce-ar-ut1m-e1", "scarce-dlm-ut1m-e40", "scarce-ar-ut1m-e40",
        "scarce-dlm-ut2m-e1", "scarce-ar-ut2m-e1", "scarce-dlm-ut2m-e40", "scarce-ar-ut2m-e40",
    ]
    assert [r.name for r in exp.runs()] == [r.name for r in runs], "expansion is deterministic"


def test_each_run_carries_its_sweep_point_applied_to_its_spec():
    exp = experiment_from_dict(experiment("s", sweep={"data.epochs": [2, 8], "optimizer.lr": [1e-3]}))
    run = exp.runs()[2]
    assert (run.arm.value, run.point) == ("diffusion", {"data.epochs": 8, "optimizer.lr": 1e-3})
    assert (run.spec.data.epochs, run.spec.optimizer.lr, run.spec.sweep) == (8, 1e-3, {})
    assert Run.model_validate_json(run.model_dump_json()) == run, "a run survives its JSON form (DLMCTL_RUN_SPEC)"


def test_every_field_of_the_spec_may_be_swept_by_its_dotted_path():
    assert {"seed", "data.epochs", "data.tokenizer.vocab_size", "optimizer.betas", "model.preset"} <= set(SWEEPABLE)
    assert not {"arms", "sweep", "data", "data.tokenizer"} & set(SWEEPABLE), "sections and arms/sweep are not fields"
    exp = experiment_from_dict(experiment("b", sweep={"optimizer.betas": [[0.9, 0.95], [0.9, 0.99]]}))
    assert [r.spec.optimizer.betas for r in exp.runs()] == [(0.9, 0.95)] * 2 + [(0.9, 0.99)] * 2


def test_colliding_sweep_abbreviations_fall_back_to_longer_names():
    exp = experiment_from_dict(experiment("c", sweep={"data.seq_len": [128], "schedule.decay_fraction": [0.1], "model.dropout": [0.1]}))
    names = [r.name for r in exp.runs()]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"data.epochs": [1, -1]}, "spec.sweep (data.epochs=-1): spec.data.epochs: must be > 0"),
        ({"data.epoch": [1, 2]}, "spec.sweep.data.epoch: not a field of the spec; a sweep key is the dotted path"),
        ({"data.epochs.x": [1]}, "spec.sweep.data.epochs.x: not a field of the spec"),
        ({"data.tokenizer": [{"kind": "byte"}]}, "spec.sweep.data.tokenizer: not a field of the spec"),
        ({"arms": [["diffusion"]]}, "spec.sweep.arms: arms cannot be swept"),
        ({"sweep": [{}]}, "spec.sweep.sweep: sweep cannot be swept"),
        ({"data.epochs": []}, "spec.sweep.data.epochs: must have at least 1 item"),
        ({"data.epochs": list(range(1, 66))}, "spec.sweep.data.epochs: must have at most 64 items"),
        ({f"model.{f}": [1] for f in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff")}
         | {f"eval.{f}": [1] for f in ("interval_steps", "batches", "elbo_samples", "mc_samples")}
         | {f"data.{f}": [1] for f in ("validation_tokens", "unique_tokens", "epochs", "seq_len")}
         | {f"checkpoint.{f}": [1] for f in ("interval_steps", "keep_last", "keep_every_epochs", "endpoint_url")},
         "spec.sweep: must have at most 16 items"),
        ({"data.epochs": [1, 1]}, "spec.sweep.data.epochs: values must be distinct"),
        ({"data.unique_tokens": [1_000_000, 1e6]}, "spec.sweep: two runs would both be named 'x-dlm-ut1m'"),
    ],
)
def test_bad_sweeps_and_duplicate_run_names_are_refused(sweep, message):
    assert message in refused(experiment("x", sweep=sweep))


# ---- names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["My_Exp", "-exp", "exp-", "exp.v1", "ünï"])
def test_metadata_name_must_be_a_kubernetes_name(name):
    assert f"metadata.name: {name!r} is not a valid Kubernetes name" in refused(experiment(name))


def test_metadata_name_is_at_most_63_characters():
    assert "metadata.name: must have at most 63 characters" in refused(experiment("a" * 64))


def test_run_names_must_fit_63_characters_with_the_replica_suffix():
    experiment_from_dict(experiment("a" * 50))  # a-...-dlm-worker-0 is exactly 63
    message = refused(experiment("a" * 51))
    assert "metadata.name: run name 'aaa" in message and "64 characters (Kubernetes allows 63)" in message
    many_nodes = experiment("a" * 50, resources={"nodes": 16}, batch={"global_sequences": 128, "micro_batch_sequences": 8})
    assert "64 characters" in refused(many_nodes), "16 nodes mean a two-digit replica index"


# ---- resources ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "resources, cpu, memory",
    [
        ({}, "4", "16Gi"),
        ({"gpus_per_node": 1}, "10", "100Gi"),
        ({"gpus_per_node": 8}, "80", "800Gi"),
        ({"gpus_per_node": 8, "cpu": "64"}, "64", "800Gi"),
        ({"gpus_per_node": 8, "memory": "1000Gi", "cpu": "95.5"}, "95.5", "1000Gi"),
        ({"memory": "2Gi"}, "4", "2Gi"),
    ],
)
def test_cpu_and_memory_default_to_a_share_per_gpu_and_explicit_values_win(resources, cpu, memory):
    res = experiment_from_dict(experiment(resources=resources, batch={"micro_batch_sequences": 1})).spec.resources
    assert (res.cpu_request, res.memory_request) == (cpu, memory)


# ---- what a cluster hands back ----------------------------------------------------------------------

def read_back(**metadata) -> dict:
    """An Experiment as `kubectl get experiment NAME -o yaml` shows it."""
    document = experiment("exp", data={"epochs": 2})
    document["metadata"] = {
        "name": "exp", "namespace": "team", "uid": "0b5c5a0e-2f0a-4b7e-9a55-4c1f3ad7f0a1", "resourceVersion": "4711",
        "generation": 1, "creationTimestamp": "2026-01-02T03:04:05Z", "deletionTimestamp": "2026-01-02T04:00:00Z",
        "deletionGracePeriodSeconds": 0, "finalizers": ["dlmctl.io/runs"], "selfLink": "/apis/dlmctl.io/x",
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "1"}],
        "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "dlmctl.io/v1alpha1"}],
        "labels": {"team": "lm"}, "annotations": {"kopf.zalando.org/last-handled-configuration": "{}"},
        **metadata,
    }
    document["status"] = {
        "phase": "Running", "observedGeneration": 1, "progress": "0/2", "startTime": "2026-01-02T03:04:06Z",
        "conditions": [{"type": "Valid", "status": "True", "reason": "Accepted", "lastTransitionTime": "2026-01-02T03:04:06Z"}],
        "runs": [{"name": "exp-dlm", "arm": "diffusion", "phase": "Preempted", "reason": "NodeLost", "restarts": 1,
                  "step": 10, "total_steps": 20, "epoch": 1, "tokens": 2560, "val_loss": 5.5, "val_loss_stderr": 0.1,
                  "last_checkpoint": "s3://b/exp-dlm/step-10", "startTime": "2026-01-02T03:04:06Z"}],
    }
    return document


def test_an_experiment_read_back_from_a_cluster_validates_and_drops_server_set_metadata():
    exp = experiment_from_dict(read_back())
    assert exp.metadata.model_dump() == {"name": "exp", "namespace": "team", "labels": {"team": "lm"},
                                         "annotations": {"kopf.zalando.org/last-handled-configuration": "{}"}}
    assert (exp.status.phase.value, exp.status.runs[0].phase.value, exp.status.runs[0].restarts) == ("Running", "Preempted", 1)
    assert exp.spec.data.epochs == 2


def test_a_typo_in_metadata_is_still_an_error():
    assert "metadata.lables: unknown field" in refused(read_back(lables={"team": "lm"}))


# ---- the YAML itself ------------------------------------------------------------------------------

def load_text(tmp_path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_experiment(path)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_invalid_yaml_names_the_line(tmp_path):
    assert "invalid YAML: line 3: expected ',' or '}', but got ']'" in load_text(tmp_path, "metadata:\n  name: x\nspec: {a: 1]\n")


def test_a_yaml_bomb_is_refused_before_it_expands(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    assert "YAML aliases (*a) are not allowed" in load_text(tmp_path, bomb)


def test_deep_nesting_is_refused(tmp_path):
    assert "nested too deeply" in load_text(tmp_path, "spec: " + "[" * 200 + "]" * 200 + "\n")


def test_a_100_mb_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: costs nothing to make
    with pytest.raises(SpecError, match="104857600 bytes is larger than 1024 KiB"):
        load_experiment(path)


def test_duplicate_keys_are_refused(tmp_path):
    text = "metadata: {name: x}\nspec:\n  data:\n    epochs: 1\n    epochs: 2\n"
    assert "line 5: duplicate key 'epochs'" in load_text(tmp_path, text)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_a_spec_must_be_a_mapping(tmp_path, text):
    assert "expected a mapping with apiVersion, kind, metadata and spec" in load_text(tmp_path, text)


def test_binary_files_and_missing_files(tmp_path):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="not UTF-8 text"):
        load_experiment(binary)
    with pytest.raises(SpecError, match="no such file"):
        load_experiment(tmp_path / "missing.yaml")


def test_the_loader_reads_exactly_what_safe_yaml_reads():
    text = (EXAMPLES / "quickstart.yaml").read_text()
    assert parse_yaml(text) == yaml.safe_load(text)


def test_an_experiment_survives_its_own_dump():
    exp = load_experiment(EXAMPLES / "scarcity-sweep.yaml")
    again = Experiment.model_validate(exp.model_dump(mode="json"))
    assert [r.model_dump() for r in again.runs()] == [r.model_dump() for r in exp.runs()]


def test_token_budgets_may_be_written_in_scientific_notation():
    document = parse_yaml("metadata: {name: sci}\nspec:\n  data: {unique_tokens: 2e6}\n  sweep: {data.epochs: [1e1, 4]}\n")
    exp = experiment_from_dict(document)
    assert exp.spec.data.unique_tokens == 2_000_000
    assert [r.spec.data.epochs for r in exp.runs()] == [10, 10, 4, 4]


def test_a_fixed_total_token_budget_gives_each_unique_budget_its_epochs():
    """total_tokens = unique_tokens x epochs at every sweep point: the data-constrained design (fixed compute)."""
    exp = experiment_from_dict(experiment("fixed", data={"total_tokens": 96_000_000, "seq_len": 128},
                                          sweep={"data.unique_tokens": [500_000, 1_000_000, 96_000_000]}))
    epochs = {r.point["data.unique_tokens"]: r.spec.data.epochs for r in exp.runs()}
    assert epochs == {500_000: 192, 1_000_000: 96, 96_000_000: 1}
    for run in exp.runs():
        assert run.spec.data.unique_tokens * run.spec.data.epochs == 96_000_000
        assert Run.model_validate_json(run.model_dump_json()) == run, "the derived epochs survive the run's JSON"
    again = Experiment.model_validate(exp.model_dump(mode="json"))
    assert [r.spec.data.epochs for r in again.runs()] == [r.spec.data.epochs for r in exp.runs()]
