"""The `dlmctl` command: light to start, one clear line and exit code 2 for every user error, never a traceback."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dlmctl.cli.app import app
from cli_runs import assert_user_error, run

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
COMMANDS = ["validate", "render", "schema", "crd", "docs", "submit", "list", "get", "logs", "cancel", "compare", "sample", "export",
            "config"]


@pytest.fixture(autouse=True)
def home(fresh_home):
    return fresh_home


# ---- start-up ------------------------------------------------------------------------------------

def test_importing_the_app_loads_neither_torch_nor_kubernetes_nor_the_spec():
    probe = (
        "import json, sys; import dlmctl.cli.app; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'kubernetes', 'kubeflow', 'pydantic'})))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(loaded) == []


def test_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "dlmctl.cli.app", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in COMMANDS:
        assert command in done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "Usage: dlmctl " + command in " ".join(out.split())


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("dlmctl ")


def test_no_arguments_shows_the_help(capsys):
    code, out, _ = run(capsys)
    assert code == 0 and "validate" in out


# ---- user errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["frobnicate"], ["No such command 'frobnicate'", "dlmctl --help"]),
        (["get"], ["Missing argument 'NAME'", "dlmctl get --help"]),
        (["validate", QUICKSTART, "--bogus"], ["No such option: --bogus"]),
        (["get", "quickstart", "-o", "xml"], ["'xml' is not one of 'table', 'yaml', 'json'"]),
        (["render", QUICKSTART, "-o", "table"], ["'table' is not one of 'yaml', 'json'"]),
        (["validate", "missing.yaml"], ["missing.yaml: no such file"]),
        (["get", "nope"], ["no experiment named 'nope'"]),
        (["logs", "nope"], ["no experiment named 'nope'"]),
        (["cancel", "nope"], ["no experiment named 'nope'"]),
        (["compare", "nope"], ["no experiment named 'nope'"]),
        (["--backend", "cloud", "list"], ["unknown backend 'cloud'; choose one of local, kubernetes, service"]),
        (["--backend", "kubernetes", "list"], ["no kubeconfig", "--backend local"]),
        (["sample", "nope", "--max-new-tokens", "0", "-p", "x"], ["--max-new-tokens"]),
        (["export", "nope", "-o", "out", "--format", "onnx"], ["No such option: --format"]),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, home, argv, fragments):
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, *fragments)
    assert not home.exists()


# A valid spec that each bad case below breaks in one place (every replace must hit: see the assert).
GOOD = """apiVersion: dlmctl.io/v1alpha1
kind: Experiment
metadata:
  name: quickstart
spec:
  seed: 1234
  data:
    unique_tokens: 131072
    epochs: 4
  metrics: {port: 0}
"""


def bad_specs(tmp_path) -> dict[str, Path]:
    text = GOOD
    specs = {
        "invalid-yaml": "metadata: {name: x}\nspec: {a: 1]\n",
        "yaml-bomb": "a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n",
        "unknown-field": text.replace("  seed: 1234", "  seed: 1234\n  seeds: 3"),
        "wrong-type": text.replace("epochs: 4", "epochs: four"),
        "negative": text.replace("epochs: 4", "epochs: -4"),
        "absurd": text.replace("unique_tokens: 131072", "unique_tokens: 100000000000000000"),
        "duplicate-runs": text + "  sweep:\n    data.unique_tokens: [131072, 131072.0]\n",
        "bad-name": text.replace("name: quickstart", "name: Quick_Start"),
        "duplicate-key": text.replace("  seed: 1234", "  seed: 1234\n  seed: 5"),
        "multi-node-locally": text.replace("  metrics: {port: 0}", "  metrics: {port: 0}\n  resources: {nodes: 2}"),
        "list-as-key": text.replace("  seed: 1234", "  seed: 1234\n  ? [a, b]\n  : 1"),
        "huge-integer": text.replace("seed: 1234", "seed: " + "9" * 5000),
        "no-api-version": text.replace("apiVersion: dlmctl.io/v1alpha1\n", ""),
        "infinite": text.replace("  seed: 1234", "  seed: 1234\n  optimizer: {grad_clip: .inf}"),
        "boolean-seed": text.replace("seed: 1234", "seed: true"),
        "too-many-runs": text + "  sweep:\n    seed: [" + ", ".join(map(str, range(40))) + "]\n    data.epochs: ["
                         + ", ".join(map(str, range(1, 31))) + "]\n",
        "keys-in-uri": text.replace("  metrics: {port: 0}", "  metrics: {port: 0}\n  checkpoint: {uri: "
                                                              "'s3://AKIAIOSFODNN7EXAMPLE:not-for-print@bucket/x'}"),
    }
    paths = {}
    for name, content in specs.items():
        assert content != text, f"{name}: the bad case must change the good spec"
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(content)
    paths["100-mb"] = tmp_path / "huge.yaml"
    with open(paths["100-mb"], "wb") as f:
        f.truncate(100 * 1024 * 1024)
    return paths


EXPECTED = {
    "invalid-yaml": "invalid YAML: line 2",
    "yaml-bomb": "YAML aliases (*a) are not allowed",
    "unknown-field": "spec.seeds: unknown field",
    "wrong-type": "spec.data.epochs: must be a number",
    "negative": "spec.data.epochs: must be > 0",
    "absurd": "spec.data.unique_tokens: must be <= 10000000000000",
    "duplicate-runs": "two runs would both be named 'quickstart-dlm-ut131072'",
    "bad-name": "metadata.name: 'Quick_Start' is not a valid Kubernetes name",
    "duplicate-key": "duplicate key 'seed'",
    "multi-node-locally": "spec.resources.nodes: the local backend runs on this machine only",
    "100-mb": "larger than 1024 KiB",
    "list-as-key": "line 7: a key must be a plain name, not a list",
    "huge-integer": "line 6: an integer of 5000 characters is too long",
    "no-api-version": "apiVersion: required field is missing",
    "infinite": "spec.optimizer.grad_clip: must be a finite number",
    "boolean-seed": "spec.seed: must be an integer",
    "too-many-runs": "spec.sweep: expands into 2400 runs (2 arms x 1200 sweep points), more than spec.max_runs (1000)",
    "keys-in-uri": "spec.checkpoint.uri: credentials do not belong in a spec",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_to_submit_is_one_line_exit_2_and_writes_nothing(capsys, home, tmp_path, case):
    code, _, err = run(capsys, "submit", bad_specs(tmp_path)[case], "--wait")
    assert_user_error(code, err, EXPECTED[case])
    assert "not-for-print" not in err and "AKIA" not in err, "a key is never printed"
    assert not home.exists(), "nothing is written under $DLMCTL_HOME"


@pytest.mark.parametrize("command", ["validate", "render"])
def test_bad_input_to_validate_and_render_is_the_same_error(capsys, tmp_path, command):
    code, _, err = run(capsys, command, bad_specs(tmp_path)["negative"])
    assert_user_error(code, err, "spec.data.epochs: must be > 0")


def test_the_installed_command_prints_no_traceback(tmp_path, home):
    spec = bad_specs(tmp_path)["negative"]
    done = subprocess.run([Path(sys.executable).with_name("dlmctl"), "submit", spec], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == f"error: {spec}: spec.data.epochs: must be > 0\n"
    assert not home.exists()


def test_an_internal_error_is_one_line_too(capsys, monkeypatch):
    import dlmctl.operator.render as render

    monkeypatch.setattr(render, "job_manifests", lambda experiment: 1 / 0)
    code, _, err = run(capsys, "render", QUICKSTART)
    assert code == 1
    assert err == "error: internal error: ZeroDivisionError: division by zero (DLMCTL_DEBUG=1 shows the traceback)\n"


# ---- commands ------------------------------------------------------------------------------------

def test_validate_lists_the_runs(capsys):
    code, out, _ = run(capsys, "validate", QUICKSTART)
    assert code == 0
    assert "quickstart-dlm" in out and "quickstart-ar" in out and "valid, 2 runs" in out


def test_list_without_experiments(capsys, home):
    code, out, _ = run(capsys, "list")
    assert code == 0 and "no experiments yet" in out
    assert run(capsys, "list", "-o", "json")[1].strip() == "[]"
    assert not home.exists()


@pytest.mark.parametrize("argv, fragments", [
    (["list", "--backend", "cloud"], ["unknown backend 'cloud'"]),
    (["get", "x", "--backend", "kubernetes"], ["no kubeconfig"]),
    (["logs", "x", "-n", "team"], ["no kubeconfig"]),  # a namespace or context means the cluster
    (["compare", "x", "--context", "prod"], ["no kubeconfig"]),
    (["submit", QUICKSTART, "--backend", "local", "-n", "team"], ["--namespace: the local backend has no"]),
    (["--backend", "local", "cancel", "x", "--context", "prod"], ["--context: the local backend has no"]),
    (["list", "-A"], ["--all-namespaces: the local backend has no namespaces"]),
])
def test_backend_context_and_namespace_work_after_the_command_too(capsys, home, argv, fragments):
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, *fragments)
    assert not home.exists()


def test_a_backend_option_after_the_command_wins_over_the_environment(capsys, monkeypatch, home):
    monkeypatch.setenv("DLMCTL_BACKEND", "kubernetes")
    code, out, _ = run(capsys, "list", "--backend", "local")
    assert code == 0 and "no experiments yet" in out


def test_sample_and_export_explain_a_missing_trainer_entry_point(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dlmctl.trainer.runs", types.ModuleType("dlmctl.trainer.runs"))
    code, _, err = run(capsys, "sample", tmp_path, "-p", "def f(")
    assert_user_error(code, err, "has no dlmctl.trainer.runs.sample_run")
    monkeypatch.setitem(sys.modules, "dlmctl.trainer.runs", None)  # None: import fails with ModuleNotFoundError
    code, _, err = run(capsys, "export", tmp_path, "-o", tmp_path / "out")
    assert_user_error(code, err, "no dlmctl.trainer.runs")


def test_sample_calls_the_trainer_with_the_run_folder(capsys, monkeypatch, tmp_path):
    calls = []
    module = types.ModuleType("dlmctl.trainer.runs")
    module.sample_run = lambda run_dir, prompt, **options: calls.append((run_dir, prompt, options)) or prompt + "return 1"
    monkeypatch.setitem(sys.modules, "dlmctl.trainer.runs", module)
    code, out, _ = run(capsys, "sample", tmp_path, "--prompt", "def f(): ", "--max-new-tokens", "8")
    assert (code, out) == (0, "def f(): return 1\n")
    assert calls == [(tmp_path, "def f(): ", {"max_new_tokens": 8, "steps": None, "temperature": 0.0, "seed": 0})]


def test_the_typer_app_is_one_root_with_the_verb_groups_merged():
    from typer.main import get_command

    assert sorted(get_command(app).commands) == sorted(COMMANDS)
