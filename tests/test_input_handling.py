"""Input handling: every mistake in a spec is one line that names the field, exit code 2, and nothing written --
found when the spec is read, not after training; no value is silently changed on its way to the trainer; and a
spec never carries, nor prints, a secret."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dlmctl.cli.app import main
from dlmctl.spec import Experiment, Run, SpecError, check_local_paths, experiment_from_dict, parse_yaml, redact
from dlmctl.spec.crd import json_schema, validation_rules
from dlmctl.spec.experiment import SWEEPABLE

import test_crd_apiserver as server

ROOT = Path(__file__).resolve().parents[1]
AKIA = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"

HEADER = "apiVersion: dlmctl.io/v1alpha1\nkind: Experiment\nmetadata: {name: x}\n"


@pytest.fixture(autouse=True)
def home(fresh_home):
    return fresh_home


def experiment(name: str = "x", metadata: dict | None = None, **spec) -> dict:
    return {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name, **(metadata or {})},
            "spec": spec}


def refused(document: dict) -> str:
    with pytest.raises(SpecError) as caught:
        experiment_from_dict(copy.deepcopy(document))
    message = str(caught.value)
    assert "\n" not in message, "a spec error is one line"
    return message


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def user_error(capsys, home, tmp_path, text: str, command: str = "submit") -> str:
    """`dlmctl COMMAND` of a spec file with `text`: exit code 2, one line on stderr, nothing written."""
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    code, _, err = cli(capsys, command, path)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, f"one line on stderr, got {err!r}"
    assert not home.exists(), "nothing is written under $DLMCTL_HOME"
    return err


# ---- 10. inputs that crashed with an internal error ------------------------------------------------------

@pytest.mark.parametrize("key, kind", [("[a, b]", "list"), ("{a: 1}", "mapping")])
def test_a_key_that_is_a_list_or_a_mapping_is_a_user_error(capsys, home, tmp_path, key, kind):
    err = user_error(capsys, home, tmp_path, HEADER + f"spec:\n  ? {key}\n  : 1\n")
    assert f"line 5: a key must be a plain name, not a {kind}" in err


@pytest.mark.parametrize("digits", [5000, 4000])
@pytest.mark.parametrize("where", ["spec:\n  seed: {n}\n", "spec:\n  data: {{epochs: {n}}}\n",
                                   "spec:\n  sweep: {{seed: [1, {n}]}}\n"])
def test_an_integer_of_thousands_of_digits_is_a_user_error(capsys, home, tmp_path, digits, where):
    err = user_error(capsys, home, tmp_path, HEADER + where.format(n="9" * digits))
    assert f"line 5: an integer of {digits} characters is too long (at most 100)" in err


def test_a_date_that_is_no_date_is_a_user_error(capsys, home, tmp_path):
    err = user_error(capsys, home, tmp_path, HEADER + "spec:\n  data: {train: 2024-13-45}\n")
    assert "line 5: cannot read '2024-13-45'" in err


# ---- 11. sweeps: a limit on runs, and expansion that stays fast ------------------------------------------

def sweep_of(seeds: int, learning_rates: int = 1, **spec) -> dict:
    """A sweep of 50 epochs x `seeds` seeds x `learning_rates` learning rates."""
    return experiment("big", sweep={"data.epochs": list(range(1, 51)), "seed": list(range(seeds)),
                                    "optimizer.lr": [(i + 1) / 1000 for i in range(learning_rates)]}, **spec)


def test_a_sweep_over_max_runs_is_refused_with_its_count():
    assert "spec.sweep: expands into 20000 runs (2 arms x 10000 sweep points), more than spec.max_runs (1000); " \
           "narrow the sweep or raise spec.max_runs" in refused(sweep_of(50, 4))


@pytest.mark.timeout(300)  # a guard: expanding 2 x 64**16 runs would never end
@pytest.mark.parametrize("command", ["validate", "render", "submit"])
def test_validate_render_and_submit_refuse_a_huge_sweep_at_once(capsys, home, tmp_path, command):
    sweep = "".join(f"    {key}: [{', '.join(str(v) for v in range(1, 65))}]\n" for key in (
        "data.epochs", "seed", "optimizer.lr", "optimizer.weight_decay", "model.dropout", "data.unique_tokens",
        "schedule.min_lr_ratio", "eval.batches", "eval.mc_samples", "eval.elbo_samples", "checkpoint.keep_last",
        "checkpoint.interval_steps", "metrics.port", "deepspeed.zero_stage", "model.n_layer", "model.d_ff"))
    err = user_error(capsys, home, tmp_path, HEADER + "spec:\n  sweep:\n" + sweep, command)
    assert f"expands into {2 * 64 ** 16} runs (2 arms x {64 ** 16} sweep points), more than spec.max_runs" in err


def test_max_runs_raises_the_limit_and_runs_are_expanded_one_at_a_time():
    document = sweep_of(12)
    assert "expands into 1200 runs" in refused(document)
    exp = experiment_from_dict({**document, "spec": {**document["spec"], "max_runs": 1200}})
    runs = exp.iter_runs()
    first = next(runs)
    assert (first.name, first.point) == ("big-dlm-e1-s0-l0p001", {"data.epochs": 1, "seed": 0, "optimizer.lr": 0.001})
    assert sum(1 for _ in runs) == 1199
    assert exp.spec.run_count == 1200


def test_max_runs_is_bounded_and_cannot_be_swept():
    assert "spec.max_runs: must be <= 100000" in refused(experiment(max_runs=10**6))
    assert "spec.max_runs: must be >= 1" in refused(experiment(max_runs=0))
    assert "max_runs" not in SWEEPABLE
    assert "spec.sweep.max_runs: max_runs cannot be swept" in refused(experiment(sweep={"max_runs": [5]}))


# ---- 12. no value silently changed on its way to the trainer ---------------------------------------------

@pytest.mark.parametrize("field, message", [
    ("optimizer: {grad_clip: .inf}", "spec.optimizer.grad_clip: must be a finite number"),
    ("model: {rope_theta: .inf}", "spec.model.rope_theta: must be a finite number"),
    ("checkpoint: {keep_every_epochs: .inf}", "spec.checkpoint.keep_every_epochs: must be a finite number"),
    ("data: {epochs: .nan}", "spec.data.epochs: must be a finite number"),
    ("optimizer: {lr: -.inf}", "spec.optimizer.lr: must be a finite number"),
    ("data: {unique_tokens: 1e400}", "spec.data.unique_tokens: must be a finite number"),
    ("seed: true", "spec.seed: must be an integer"),
    ("data: {epochs: true}", "spec.data.epochs: must be a number"),
    ("seed: '7'", "spec.seed: must be an integer"),
    ("optimizer: {lr: '3e-3'}", "spec.optimizer.lr: must be a number"),
    ("data: {unique_tokens: 1.5e6}", None),
    ("data: {unique_tokens: 1000000.5}", "spec.data.unique_tokens: must be a whole number"),
    ("deepspeed: {activation_checkpointing: 1}", "spec.deepspeed.activation_checkpointing: must be true or false"),
    ("model: {qk_norm: 'yes'}", "spec.model.qk_norm: must be true or false"),
    ("optimizer: {betas: [0.9, true]}", "spec.optimizer.betas: must be a number"),
    ("sweep: {seed: [1, true]}", "spec.sweep (seed=True): spec.seed: must be an integer"),
])
def test_numbers_are_taken_strictly(field, message):
    document = parse_yaml(HEADER + f"spec:\n  {field}\n")
    if message is None:
        experiment_from_dict(document)
    else:
        assert message in refused(document)


def test_yaml_1_2_scientific_notation_still_makes_integers():
    exp = experiment_from_dict(parse_yaml(HEADER + "spec:\n  data: {unique_tokens: 2e6, validation_tokens: 4.096e3}\n"
                                          "  sweep: {data.unique_tokens: [1e6, 3e6]}\n"))
    assert (exp.spec.data.unique_tokens, exp.spec.data.validation_tokens) == (2_000_000, 4096)
    assert all(type(v) is int for v in (exp.spec.data.unique_tokens, exp.spec.data.validation_tokens))
    assert [r.spec.data.unique_tokens for r in exp.runs()] == [1_000_000, 1_000_000, 3_000_000, 3_000_000]


def test_what_the_trainer_reads_is_what_was_written():
    exp = experiment_from_dict(experiment(optimizer={"grad_clip": 1e6}, model={"rope_theta": 5e5},
                                          checkpoint={"keep_every_epochs": 1e4}))
    run = exp.runs()[0]
    again = Run.model_validate_json(run.model_dump_json())  # DLMCTL_RUN_SPEC
    assert (again.spec.optimizer.grad_clip, again.spec.model.rope_theta, again.spec.checkpoint.keep_every_epochs) == \
        (1e6, 5e5, 1e4)


# ---- 13. values that would only fail later ----------------------------------------------------------------

CREDENTIALS = "credentials do not belong in a spec: put them in the Kubernetes Secret named by " \
              "spec.checkpoint.credentials_secret"
BUCKET_RULE = "expected s3://BUCKET[/KEY], where BUCKET is 3-63 lowercase letters"
ROOT_RULE = "must name a file, folder or s3:// prefix, not the filesystem root"


@pytest.mark.parametrize("uri, message", [
    ("s3://", BUCKET_RULE),
    ("", ROOT_RULE),
    ("/", ROOT_RULE),
    ("file:///", ROOT_RULE),
    ("s3://My_Bucket/x", BUCKET_RULE),
    ("s3://ab/x", BUCKET_RULE),
    ("s3:///key", BUCKET_RULE),
    ("s3://bucket-/x", BUCKET_RULE),
    ("s3://bucket..name/x", "an S3 bucket name may not contain '..'"),
    ("s3://192.168.1.10/x", "an S3 bucket name may not be an IP address"),
    ("s3://bucket/a/../b", "'.' and '..' are not allowed as key segments"),
    ("s3://bucket/..", "'.' and '..' are not allowed as key segments"),
    ("s3://bucket//b", "empty key segments ('//') are not allowed"),
    ("s3://bucket/a//b/", "empty key segments ('//') are not allowed"),
    (f"s3://{AKIA}:{SECRET}@bucket/x", CREDENTIALS),
    ("gs://bucket/x", "'gs://bucket/x': only s3:// and local paths are supported"),
])
@pytest.mark.parametrize("field", ["checkpoint.uri", "data.train", "data.validation", "data.cache", "data.tokenizer.path"])
def test_malformed_locations_are_refused(field, uri, message):
    section, *rest = field.split(".")
    value: dict = {rest[-1]: uri}
    if field == "data.tokenizer.path":
        value = {"tokenizer": {"kind": "file", "path": uri}}
    error = refused(experiment(**{section: value}))
    assert f"spec.{field}: " in error and message in error, error
    assert SECRET not in error and AKIA not in error


@pytest.mark.parametrize("uri", ["s3://bucket/prefix/", "s3://my.bucket-1/a/b.c/", "s3://bucket", "/data/ckpt",
                                 "./ckpt", "../ckpt", "~/ckpt", "ckpt", "file:///data/ckpt", "s3://bucket/a@b/c"])
def test_well_formed_locations_are_accepted(uri):
    experiment_from_dict(experiment(checkpoint={"uri": uri}, data={"cache": uri}))


@pytest.mark.parametrize("url, message", [
    (f"https://{AKIA}:{SECRET}@minio.example:9000", CREDENTIALS),
    (f"http://{AKIA}@minio:9000", CREDENTIALS),
    (f"https://minio:9000/?X-Amz-Credential={AKIA}", "expected http(s)://HOST[:PORT][/PATH], without a query"),
    ("https://minio:9000/#x", "without a query or fragment"),
    ("ftp://minio", "does not match the pattern"),
])
def test_an_endpoint_url_carries_no_credentials(url, message):
    error = refused(experiment(checkpoint={"endpoint_url": url}))
    assert "spec.checkpoint.endpoint_url: " in error and message in error, error
    assert SECRET not in error and AKIA not in error


@pytest.mark.parametrize("url", ["http://127.0.0.1:8333", "https://s3.eu-west-1.amazonaws.com", "http://minio:9000/s3"])
def test_plain_endpoints_are_accepted(url):
    experiment_from_dict(experiment(checkpoint={"endpoint_url": url}))


@pytest.mark.parametrize("spec, message", [
    ({"data": {"validation_tokens": 100, "seq_len": 256}},
     "spec.data.validation_tokens: 100 is less than one sequence (seq_len=256)"),
    ({"data": {"seq_len": 32}},
     "spec.eval.choice_task: context_tokens + continuation_tokens (48 + 16) must be <= data.seq_len (32)"),
    ({"data": {"validation_tokens": 1000}},
     "spec.eval.choice_task.examples: 64 examples of 64 tokens with 4 choices need 64 windows, but "
     "data.validation_tokens (1000) holds 15; raise data.validation_tokens or lower the examples"),
    ({"data": {"validation_tokens": 256}, "eval": {"choice_task": {"examples": 2, "choices": 8}}},
     "need 8 windows, but data.validation_tokens (256) holds 4"),
    ({"data": {"tokenizer": {"kind": "byte", "vocab_size": 512}}},
     "spec.data.tokenizer.vocab_size: not allowed when kind is 'byte'"),
    ({"resources": {"cpu": "0"}}, "spec.resources.cpu: '0' is not a positive CPU quantity"),
    ({"resources": {"cpu": "0m"}}, "spec.resources.cpu: '0m' is not a positive CPU quantity"),
    ({"resources": {"cpu": "0.000"}}, "spec.resources.cpu: '0.000' is not a positive CPU quantity"),
    ({"resources": {"memory": "0"}}, "spec.resources.memory: '0' is not a positive memory quantity"),
    ({"resources": {"memory": "0Gi"}}, "spec.resources.memory: '0Gi' is not a positive memory quantity"),
    ({"resources": {"memory": "16K"}}, "spec.resources.memory: '16K' is not a positive memory quantity"),
    ({"resources": {"image": "Not An Image"}}, "spec.resources.image: 'Not An Image' is not an image reference"),
    ({"resources": {"image": "MyOrg/trainer:1"}}, "spec.resources.image: 'MyOrg/trainer:1' is not an image reference"),
    ({"resources": {"image": "trainer:"}}, "is not an image reference"),
    ({"resources": {"image": "ghcr.io/x/trainer@sha256:abc"}}, "is not an image reference"),
    ({"scheduling": {"priority_class": "High_Prio"}},
     "spec.scheduling.priority_class: 'High_Prio' is not a valid PriorityClass name"),
    ({"scheduling": {"priority_class": "-low"}}, "is not a valid PriorityClass name"),
    ({"data": {"cache": "http://cache.example/tokens"}},
     "spec.data.cache: 'http://cache.example/tokens': only s3:// and local paths are supported"),
])
def test_values_that_would_fail_later_are_refused_now(spec, message):
    assert message in refused(experiment(**spec))


@pytest.mark.parametrize("spec", [
    {"data": {"tokenizer": {"kind": "byte"}}},
    {"data": {"seq_len": 32, "validation_tokens": 4096}, "eval": {"choice_task": {"examples": 0}}},
    {"data": {"seq_len": 32, "validation_tokens": 4096},
     "eval": {"choice_task": {"context_tokens": 24, "continuation_tokens": 8}}},
    {"resources": {"cpu": "500m", "memory": "512Mi"}},
    {"resources": {"cpu": "0.5", "memory": "2G"}},
    {"resources": {"cpu": "95.5", "memory": "100k"}},
    {"resources": {"image": "busybox"}},
    {"resources": {"image": "localhost:5000/team/trainer:1.0-rc.1"}},
    {"resources": {"image": "docker.io/pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"}},
    {"resources": {"image": "ghcr.io/dlmctl/trainer@sha256:" + "a" * 64}},
    {"resources": {"image": "ghcr.io/dlmctl/trainer:0.1.0@sha256:" + "0f" * 32}},
    {"scheduling": {"priority_class": "preemptible"}},
    {"scheduling": {"priority_class": "system.high-priority"}},
])
def test_values_kubernetes_and_the_trainer_accept_are_still_accepted(spec):
    experiment_from_dict(experiment(**spec))


@pytest.mark.parametrize("labels, message", [
    ({"bad key!": "x"}, "metadata.labels: 'bad key!' is not a valid label key"),
    ({"a" * 64: "x"}, "is not a valid label key"),
    ({"Bad_Prefix.io/name": "x"}, "'Bad_Prefix.io/name' is not a valid label key"),
    ({"/name": "x"}, "is not a valid label key"),
    ({"team": "a b"}, "metadata.labels.team: 'a b' is not a valid label value"),
    ({"team": "v" * 64}, "metadata.labels.team: "),
    ({"team": "-lm"}, "is not a valid label value"),
])
def test_labels_kubernetes_would_refuse_are_refused(labels, message):
    assert message in refused(experiment(metadata={"labels": labels}))


def test_valid_labels_and_annotation_keys_are_accepted():
    labels = {"team": "lm", "app.kubernetes.io/name": "dlmctl", "empty": "", "x" * 63: "v" * 63}
    exp = experiment_from_dict(experiment(metadata={"labels": labels, "annotations": {"note": "any text: at all"}}))
    assert exp.metadata.labels == labels
    assert "metadata.annotations: 'not a key' is not a valid annotation key" in refused(
        experiment(metadata={"annotations": {"not a key": "x"}}))


def test_retry_deadline_of_checkpoint_uploads():
    assert experiment_from_dict(experiment()).spec.checkpoint.retry_deadline_seconds == 3600
    assert experiment_from_dict(experiment(checkpoint={"retry_deadline_seconds": 60})).spec.checkpoint \
        .retry_deadline_seconds == 60
    assert "spec.checkpoint.retry_deadline_seconds: must be >= 1" in refused(
        experiment(checkpoint={"retry_deadline_seconds": 0}))
    field = json_schema()["$defs"]["CheckpointSpec"]["properties"]["retry_deadline_seconds"]
    assert field["description"] == "how long checkpoint uploads retry an unreachable store before the run fails"


# ---- 13. what a local run reads must be on this machine: check_local_paths ---------------------------------

def local(tmp_path: Path, **data) -> Experiment:
    return experiment_from_dict(experiment(data={"unique_tokens": 4096, "validation_tokens": 4096, "seq_len": 64,
                                                 "tokenizer": {"kind": "byte"}, **data}))


def local_error(exp: Experiment) -> str:
    with pytest.raises(SpecError) as caught:
        check_local_paths(exp)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_local_paths_that_exist_pass(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("x" * 10_000)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    check_local_paths(local(tmp_path, train=str(tmp_path / "corpus")))
    check_local_paths(local(tmp_path, train=f"file://{tmp_path / 'corpus' / 'a.txt'}",
                            tokenizer={"kind": "file", "path": str(tmp_path / "tok")}))
    check_local_paths(local(tmp_path, train="builtin:python-stdlib"))
    check_local_paths(local(tmp_path, train="s3://corpora/train/", validation="s3://corpora/val/"))  # not here to check


def test_a_missing_training_validation_or_tokenizer_path_names_the_field(tmp_path):
    missing = tmp_path / "missing"
    assert local_error(local(tmp_path, train=str(missing))) == f"spec.data.train: {missing} does not exist"
    (tmp_path / "a.txt").write_text("x" * 10_000)
    assert local_error(local(tmp_path, train=str(tmp_path / "a.txt"), validation=str(missing))) == \
        f"spec.data.validation: {missing} does not exist"
    assert local_error(local(tmp_path, tokenizer={"kind": "file", "path": str(missing)})) == \
        f"spec.data.tokenizer.path: {missing} does not exist"
    assert "(a folder without tokenizer.json)" in local_error(local(tmp_path, tokenizer={"kind": "file",
                                                                                         "path": str(tmp_path)}))


def test_a_missing_path_in_one_sweep_point_is_named_with_the_point(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are read from the current directory
    Path("a.txt").write_text("x" * 10_000)
    exp = experiment_from_dict(experiment(data={"unique_tokens": 4096, "validation_tokens": 4096, "seq_len": 64},
                                          sweep={"data.train": ["a.txt", "b.txt"]}))
    assert local_error(exp) == "spec.data.train: b.txt does not exist (sweep point data.train='b.txt')"


def test_a_validation_set_larger_than_the_data_is_refused_before_the_run(tmp_path):
    (tmp_path / "small.txt").write_text("x" * 3000)  # at most 6000 tokens of any byte-level tokenizer
    (tmp_path / "big.txt").write_text("x" * 100_000)
    assert local_error(local(tmp_path, train=str(tmp_path / "small.txt"))) == (
        f"spec.data.validation_tokens: 4,096 validation tokens are held out of {tmp_path / 'small.txt'} besides "
        "4,096 unique tokens, but it has 3,000 bytes of text (at most 6,000 tokens); lower one of them or set "
        "spec.data.validation")
    assert local_error(local(tmp_path, train=str(tmp_path / "big.txt"), validation=str(tmp_path / "small.txt"),
                             validation_tokens=8192)).startswith(
        f"spec.data.validation_tokens: 8,192 tokens asked but {tmp_path / 'small.txt'} has 3,000 bytes of text")
    assert local_error(local(tmp_path, train=str(tmp_path / "small.txt"), validation=str(tmp_path / "big.txt"),
                             unique_tokens=10_000)).startswith("spec.data.unique_tokens: 10,000 tokens asked")
    check_local_paths(local(tmp_path, train=str(tmp_path / "big.txt")))


# ---- 14. a spec file says what it is ---------------------------------------------------------------------

@pytest.mark.parametrize("text, missing", [
    ("kind: Experiment\nmetadata: {name: x}\n", "apiVersion"),
    ("apiVersion: dlmctl.io/v1alpha1\nmetadata: {name: x}\nspec: {}\n", "kind"),
    ("metadata: {name: x}\nspec: {}\n", "apiVersion"),
])
def test_a_spec_file_without_apiversion_or_kind_is_refused(capsys, home, tmp_path, text, missing):
    err = user_error(capsys, home, tmp_path, text, "validate")
    assert f"{missing}: required field is missing (a spec file starts with apiVersion: dlmctl.io/v1alpha1 and " \
           "kind: Experiment)" in err
    assert user_error(capsys, home, tmp_path, text, "submit") == err


def test_standard_input_must_say_what_it_is_too(capsys, home, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"buffer": io.BytesIO(b"kind: Experiment\nmetadata: {name: x}\n")}))
    code, _, err = cli(capsys, "validate", "-")
    assert code == 2 and "error: <stdin>: apiVersion: required field is missing" in err
    assert not home.exists()


def test_the_json_schema_requires_apiversion_kind_and_metadata():
    assert json_schema()["required"] == ["apiVersion", "kind", "metadata"]


# ---- 15. secrets are refused, and masked wherever a spec is printed ------------------------------------------

def test_keys_in_a_checkpoint_uri_are_refused_and_never_echoed(capsys, home, tmp_path):
    text = HEADER + f"spec:\n  checkpoint: {{uri: 's3://{AKIA}:{SECRET}@bucket/x'}}\n"
    for command in ("validate", "render", "submit"):
        err = user_error(capsys, home, tmp_path, text, command)
        assert "spec.checkpoint.uri: credentials do not belong in a spec" in err
        assert SECRET not in err and AKIA not in err


def test_a_refused_value_is_shown_masked():
    error = refused(experiment(checkpoint={"uri": f"gs://user:{SECRET}@bucket/x"}))
    assert "spec.checkpoint.uri: 'gs://***@bucket/x': only s3:// and local paths are supported" in error
    error = refused(experiment(sweep={"checkpoint.endpoint_url": [f"https://u:{SECRET}@minio:9000"]}))
    assert "spec.sweep (checkpoint.endpoint_url='https://***@minio:9000')" in error and SECRET not in error


def test_redact_masks_what_looks_like_a_key_and_keeps_the_rest():
    document = {
        "uri": f"s3://{AKIA}:{SECRET}@bucket/x", "endpoint": f"https://minio/?X-Amz-Signature={SECRET}&region=eu",
        "note": f"key {AKIA} in passing", "credentials_secret": "s3-credentials", "unique_tokens": 5,
        "AWS_SECRET_ACCESS_KEY": SECRET, "password": SECRET, "tokens": 42,
        "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": SECRET}, {"name": "DLMCTL_RUN_SPEC",
                                                                     "value": json.dumps({"uri": f"s3://a:{SECRET}@b/c"})}],
    }
    masked = redact(document)
    assert SECRET not in json.dumps(masked) and AKIA not in json.dumps(masked)
    assert masked["uri"] == "s3://***@bucket/x"
    assert masked["endpoint"] == "https://minio/?X-Amz-Signature=***&region=eu"
    assert masked["note"] == "key *** in passing"
    assert (masked["credentials_secret"], masked["unique_tokens"], masked["tokens"]) == ("s3-credentials", 5, 42)
    assert masked["AWS_SECRET_ACCESS_KEY"] == masked["password"] == masked["env"][0]["value"] == "***"
    assert json.loads(masked["env"][1]["value"]) == {"uri": "s3://***@b/c"}
    assert redact(experiment_from_dict(experiment()).model_dump(mode="json")) == \
        experiment_from_dict(experiment()).model_dump(mode="json"), "a spec without secrets prints as it is"


def stored_with_a_secret() -> Experiment:
    """An Experiment as an older dlmctl stored it: keys in its checkpoint URI and endpoint."""
    exp = experiment_from_dict(experiment("old", checkpoint={"uri": "s3://bucket/x"}))
    checkpoint = exp.spec.checkpoint.model_construct(
        **{**exp.spec.checkpoint.model_dump(), "uri": f"s3://{AKIA}:{SECRET}@bucket/x",
           "endpoint_url": f"https://{AKIA}:{SECRET}@minio:9000"})
    return exp.model_construct(**{**dict(exp), "spec": exp.spec.model_construct(**{**dict(exp.spec),
                                                                                   "checkpoint": checkpoint})})


@pytest.mark.parametrize("output", ["yaml", "json"])
def test_get_prints_a_stored_experiment_with_its_keys_masked(capsys, monkeypatch, output):
    import dlmctl.cli.run_commands as run_commands

    exp = stored_with_a_secret()
    assert SECRET in exp.model_dump_json()
    monkeypatch.setattr(run_commands, "backend", lambda ctx: type("Backend", (), {"get": lambda self, name: exp})())
    code, out, _ = cli(capsys, "get", "old", "-o", output)
    assert code == 0 and "s3://***@bucket/x" in out and "https://***@minio:9000" in out
    assert SECRET not in out and AKIA not in out


@pytest.mark.parametrize("output", ["yaml", "json"])
def test_render_prints_objects_with_their_keys_masked(capsys, monkeypatch, output):
    import dlmctl.operator.render as jobs

    job = {"kind": "PyTorchJob", "env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": SECRET},
                                         {"name": "DLMCTL_RUN_SPEC", "value": f'{{"uri": "s3://{AKIA}:{SECRET}@b/x"}}'}]}
    monkeypatch.setattr(jobs, "job_manifests", lambda experiment: [job])
    code, out, _ = cli(capsys, "render", ROOT / "examples" / "quickstart.yaml", "-o", output)
    assert code == 0 and "PyTorchJob" in out and "s3://***@b/x" in out
    assert SECRET not in out and AKIA not in out


# ---- the CRD says the same --------------------------------------------------------------------------------

def test_the_crd_carries_the_new_rules():
    rules = validation_rules()
    messages = [r["message"] for rules_ in rules.values() for r in rules_]
    for field in ("spec.checkpoint.uri", "spec.checkpoint.endpoint_url", "spec.data.train", "spec.data.validation",
                  "spec.data.cache", "spec.data.tokenizer.path"):
        assert any(m.startswith(f"{field}: must be") for m in messages), field
    assert any(m.startswith("spec.sweep: expands into more runs") for m in messages)
    assert any(m.startswith("spec.eval.choice_task: ") for m in messages)
    assert any(m.startswith("spec.data.validation_tokens: ") for m in messages)
    assert any(m.startswith("spec.data.tokenizer.vocab_size: ") for m in messages)


# On the real API server (tests/testenv): it refuses what the models refuse, naming the same field.

experiments = server.experiments  # the fixture: the CustomObjectsApi, with the generated CRD installed

SERVER_REFUSED = {
    "s3-without-bucket": ({"checkpoint": {"uri": "s3://"}}, ["spec.checkpoint.uri: " + BUCKET_RULE]),
    "empty-uri": ({"checkpoint": {"uri": ""}}, ["spec.checkpoint.uri"]),
    "root-uri": ({"checkpoint": {"uri": "/"}}, ["spec.checkpoint.uri: " + ROOT_RULE]),
    "bad-bucket": ({"checkpoint": {"uri": "s3://My_Bucket/x"}}, ["spec.checkpoint.uri: " + BUCKET_RULE]),
    "dotdot-key": ({"data": {"train": "s3://bucket/a/../b"}},
                   ["spec.data.train: '.' and '..' are not allowed as key segments"]),
    "empty-key-segment": ({"data": {"cache": "s3://bucket//b"}},
                          ["spec.data.cache: empty key segments ('//') are not allowed"]),
    "keys-in-uri": ({"checkpoint": {"uri": f"s3://{AKIA}:{SECRET}@bucket/x"}}, ["spec.checkpoint.uri: " + CREDENTIALS]),
    "keys-in-endpoint": ({"checkpoint": {"endpoint_url": f"https://{AKIA}:{SECRET}@minio:9000"}},
                         ["spec.checkpoint.endpoint_url: " + CREDENTIALS]),
    "cache-scheme": ({"data": {"cache": "gs://x/y"}},
                     ["spec.data.cache: 'gs://x/y': only s3:// and local paths are supported"]),
    "validation-below-a-sequence": ({"data": {"validation_tokens": 100}},
                                    ["spec.data.validation_tokens: 100 is less than one sequence (seq_len=128)"]),
    "choice-longer-than-a-sequence": (
        {"eval": {"choice_task": {"context_tokens": 120, "continuation_tokens": 16}}},
        ["spec.eval.choice_task: context_tokens + continuation_tokens (120 + 16) must be <= data.seq_len (128)"]),
    "choice-windows": ({"data": {"validation_tokens": 1024}},
                       ["spec.eval.choice_task.examples: 32 examples of 64 tokens with 4 choices need 32 windows, "
                        "but data.validation_tokens (1024) holds 16"]),
    "byte-vocab": ({"data": {"tokenizer": {"kind": "byte", "vocab_size": 1024}}},
                   ["spec.data.tokenizer.vocab_size: not allowed when kind is 'byte'"]),
    "zero-cpu": ({"resources": {"cpu": "0"}}, ["spec.resources.cpu"]),
    "zero-memory": ({"resources": {"memory": "0Gi"}}, ["spec.resources.memory"]),
    "image": ({"resources": {"image": "Not An Image"}}, ["spec.resources.image"]),
    "priority-class": ({"scheduling": {"priority_class": "High_Prio"}}, ["spec.scheduling.priority_class"]),
    "too-many-runs": ({"sweep": {"data.epochs": list(range(1, 51)), "seed": list(range(11))}},
                      ["spec.sweep: expands into 1100 runs (2 arms x 550 sweep points), more than spec.max_runs (1000)"]),
    "max-runs-swept": ({"sweep": {"max_runs": [5]}}, ["spec.sweep", "max_runs"]),
}


@pytest.mark.cluster
@pytest.mark.parametrize("case", list(SERVER_REFUSED))
def test_the_api_server_refuses_these_too(experiments, cluster_namespace, case):
    spec, fragments = SERVER_REFUSED[case]
    document = server.quickstart(**copy.deepcopy(spec))
    by_models = server.refused_by_models(document)
    by_server = server.refused_by_server(experiments, cluster_namespace, document)
    for fragment in fragments:
        assert fragment in by_models, by_models
        assert fragment in by_server, by_server
    assert SECRET not in by_models


@pytest.mark.cluster
def test_the_api_server_counts_a_huge_sweep_and_honours_a_raised_limit(experiments, cluster_namespace):
    keys = ["data.epochs", "seed", "optimizer.lr", "optimizer.weight_decay", "model.dropout", "data.unique_tokens",
            "schedule.min_lr_ratio", "eval.batches", "eval.mc_samples", "eval.elbo_samples", "checkpoint.keep_last",
            "checkpoint.interval_steps", "metrics.port", "deepspeed.zero_stage", "model.n_layer", "model.d_ff"]
    huge = server.quickstart(sweep={key: list(range(1, 65)) for key in keys})
    assert "spec.sweep: expands into more runs" in server.refused_by_server(experiments, cluster_namespace, huge)
    raised = server.quickstart(sweep={"seed": list(range(11)), "data.epochs": list(range(1, 51))}, max_runs=1100)
    experiment_from_dict(copy.deepcopy(raised))
    server.create(experiments, cluster_namespace, raised)



def test_a_local_submit_of_a_missing_corpus_fails_naming_it_and_writes_nothing(tmp_path, home, capsys):
    spec = tmp_path / "missing.yaml"
    spec.write_text("apiVersion: dlmctl.io/v1alpha1\nkind: Experiment\nmetadata: {name: missing}\n"
                    f"spec: {{data: {{train: {tmp_path / 'no-such-corpus'}}}}}\n")
    assert main(["submit", str(spec), "--backend", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: spec.data.train:") and "does not exist" in err and "\n" not in err, err
    assert not home.exists(), "nothing written"


def test_a_trainer_whose_data_is_missing_exits_2_with_one_line_naming_the_field(tmp_path):
    """Exit code 2 is what a person must fix: the local supervisor and the operator do not retry it."""
    import subprocess
    import sys

    from dlmctl.spec import experiment_from_dict

    run = experiment_from_dict({"metadata": {"name": "gone"}, "spec": {
        "arms": ["diffusion"], "model": {"preset": "nano"}, "data": {"train": str(tmp_path / "missing.txt")},
        "metrics": {"port": 0}}}).runs()[0]
    (tmp_path / "run.json").write_text(run.model_dump_json())
    done = subprocess.run([sys.executable, "-m", "dlmctl.trainer", "--run", str(tmp_path / "run.json"),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: spec.data.train: {tmp_path / 'missing.txt'} does not exist"
