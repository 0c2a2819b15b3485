"""The Experiment CRD, JSON Schema and spec reference are generated from the pydantic models, and kept committed."""
import json
from pathlib import Path

from dlmctl.cli.app import main
from dlmctl.spec import PRESETS
from dlmctl.spec.crd import crd, crd_yaml, integer_bound_ok, json_schema, validation_rules
from dlmctl.spec.docs import reference_markdown
from dlmctl.spec.experiment import SWEEPABLE

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_CRD = ROOT / "charts" / "dlmctl" / "crds" / "experiments.dlmctl.io.yaml"
SPEC_REFERENCE = ROOT / "docs" / "spec-reference.md"


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


def nodes(node: dict, path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}".lstrip("."))
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from nodes(node[key], f"{path}[]")


def test_every_integer_bound_is_one_the_api_server_can_hold():
    """The API server holds bounds as float64 and reads an integer field's bounds back as int64: it refused
    spec.seed's maximum of 2**63 and would refuse 2**63 - 1 too (a float64 rounds it up to 2**63)."""
    bounds = [(path, node[key]) for path, node in nodes(schema()) if node.get("type") == "integer"
              for key in ("minimum", "maximum") if key in node]
    assert ("spec.seed", 2**53 - 1) in bounds
    assert [b for b in bounds if not integer_bound_ok(b[1])] == []
    assert not integer_bound_ok(2**63 - 1) and not integer_bound_ok(2**63) and integer_bound_ok(2**63 - 1024)
    assert "&id" not in crd_yaml(), "no YAML anchors"


def test_json_schema_2020_constructs_become_openapi_v3():
    assert field("spec.optimizer.eps") == {"type": "number", "description": "Default: 1e-08.", "minimum": 0,
                                          "exclusiveMinimum": True, "maximum": 1, "exclusiveMaximum": True}
    assert field("spec.model.n_layer")["nullable"] is True
    betas = field("spec.optimizer.betas")
    assert (betas["items"], betas["minItems"], betas["maxItems"]) == (
        {"type": "number", "minimum": 0, "maximum": 1, "exclusiveMaximum": True}, 2, 2)
    assert field("spec.arms")["items"] == {"type": "string", "enum": ["diffusion", "autoregressive"]}
    assert field("kind") == {"type": "string", "description": "Experiment"}


def test_sweep_declares_every_sweepable_field_with_that_fields_own_schema():
    sweep = field("spec.sweep")
    assert list(sweep["properties"]) == list(SWEEPABLE)
    assert "arms" not in sweep["properties"] and "sweep" not in sweep["properties"]
    assert sweep["properties"]["data.epochs"] == {
        "type": "array", "description": "values of spec.data.epochs", "minItems": 1, "maxItems": 64,
        "items": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 100000}}
    assert sweep["maxProperties"] == 16
    assert sweep["x-kubernetes-preserve-unknown-fields"] is True, "unknown keys are kept, so CEL can refuse them"


def test_closed_objects_rely_on_pruning_not_additional_properties_false():
    assert "additionalProperties" not in field("spec.data")
    assert field("spec.data")["properties"]["epochs"]["minimum"] == 0


def test_cel_rules_come_from_the_models():
    rules = validation_rules()
    (preset,) = rules["spec.model"]
    assert all(f'"{name}"' in preset["rule"] for name in PRESETS)
    (keys,) = rules["spec.sweep"]
    assert keys["rule"].count("has(self.") == len(SWEEPABLE)
    assert "has(self.data__dot__tokenizer__dot__vocab_size)" in keys["rule"]
    batch = next(r for r in rules["spec"] if r.get("fieldPath") == ".batch")
    assert "orValue(256)" in batch["rule"] and "orValue(32)" in batch["rule"] and "orValue(8)" in batch["rule"]
    for path, node in nodes(schema()):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["message"].startswith(("spec", path)), rule
    assert field("spec")["x-kubernetes-validations"] == rules["spec"]


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
