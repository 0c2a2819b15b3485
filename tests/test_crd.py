"""The Experiment CRD, JSON Schema and spec reference are generated from the pydantic models, and kept committed."""
import json
from pathlib import Path

import pytest
import yaml

from dlmctl.cli.app import main
from dlmctl.spec import experiment_from_dict, load_experiment
from dlmctl.spec.crd import crd, crd_yaml, json_schema
from dlmctl.spec.docs import reference_markdown
from openapi_check import structural_problems, validate

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_CRD = ROOT / "charts" / "dlmctl" / "crds" / "experiments.dlmctl.io.yaml"
SPEC_REFERENCE = ROOT / "docs" / "spec-reference.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def field(path: str) -> dict:
    node = schema()
    for part in path.split("."):
        node = node["properties"][part]
    return node


def test_the_committed_crd_is_the_generated_one():
    assert COMMITTED_CRD.read_text() == crd_yaml(), "regenerate: dlmctl crd > charts/dlmctl/crds/experiments.dlmctl.io.yaml"


def test_the_spec_reference_is_current():
    assert SPEC_REFERENCE.read_text() == reference_markdown(), "regenerate: dlmctl docs -o docs/spec-reference.md"


def test_crd_identity_scope_status_and_columns():
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == "experiments.dlmctl.io"
    assert (spec["group"], spec["scope"]) == ("dlmctl.io", "Namespaced")
    assert spec["names"] == {"kind": "Experiment", "listKind": "ExperimentList", "plural": "experiments",
                             "singular": "experiment", "shortNames": ["dlmx"]}
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    assert [(c["name"], c["jsonPath"]) for c in version["additionalPrinterColumns"]] == [
        ("Phase", ".status.phase"), ("Runs", ".status.progress"), ("Age", ".metadata.creationTimestamp")]


def test_the_schema_is_structural():
    assert structural_problems(schema()) == []
    assert "&id" not in crd_yaml(), "no YAML anchors"


def test_json_schema_2020_constructs_become_openapi_v3():
    assert field("spec.optimizer.eps") == {"type": "number", "description": "Default: 1e-08.", "minimum": 0,
                                          "exclusiveMinimum": True, "maximum": 1, "exclusiveMaximum": True}
    assert field("spec.model.n_layer")["nullable"] is True
    betas = field("spec.optimizer.betas")
    assert (betas["items"], betas["minItems"], betas["maxItems"]) == ({"type": "number"}, 2, 2)
    assert field("spec.arms")["items"] == {"type": "string", "enum": ["diffusion", "autoregressive"]}
    assert field("kind") == {"type": "string", "description": "Experiment"}


def test_sweep_keeps_arbitrary_values():
    sweep = field("spec.sweep")
    assert sweep["x-kubernetes-preserve-unknown-fields"] is True
    assert sweep["additionalProperties"] == {"type": "array", "items": {"x-kubernetes-preserve-unknown-fields": True}}


def test_closed_objects_rely_on_pruning_not_additional_properties_false():
    assert "additionalProperties" not in field("spec.data")
    assert field("spec.data")["properties"]["epochs"]["minimum"] == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_api_server_would_accept_every_valid_spec(path):
    assert validate(yaml.safe_load(path.read_text()), schema()) == []
    assert validate(load_experiment(path).model_dump(mode="json", exclude={"status"}), schema()) == []


def test_the_api_server_would_refuse_what_pydantic_refuses():
    document = yaml.safe_load(EXAMPLES[0].read_text())
    document["spec"]["data"]["epochs"] = 0
    document["spec"]["model"]["layers"] = 3
    assert validate(document, schema()) == [
        "spec.model.layers: unknown field (would be pruned)", "spec.data.epochs: must be > 0"]


def test_status_fits_the_schema():
    exp = experiment_from_dict({"metadata": {"name": "x"}, "status": {
        "phase": "Running", "progress": "1/2", "runs": [{"name": "x-dlm", "arm": "diffusion", "step": 3, "val_loss": 2.5}]}})
    assert validate(exp.model_dump(mode="json"), schema()) == []


def test_json_schema_is_the_pydantic_schema_with_an_id(capsys):
    assert main(["schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json_schema()
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "ExperimentSpec" in printed["$defs"]


def test_crd_command_prints_the_committed_file(capsys):
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == COMMITTED_CRD.read_text()
    assert main(["crd", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == crd()


def test_docs_command_checks_and_writes(tmp_path, capsys):
    target = tmp_path / "ref.md"
    assert main(["docs", "-o", str(target), "--check"]) == 1
    assert main(["docs", "-o", str(target)]) == 0
    assert main(["docs", "-o", str(target), "--check"]) == 0
    assert "| `epochs` | number | `4.0` | > 0, <= 100000 |" in target.read_text()
