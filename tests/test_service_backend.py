"""The CLI's service backend and its contexts: `dlmctl config` keeps named contexts in a file only its owner can
read, a token never passes through the command line or an output, the command line chooses over the
environment over the current context, and `dlmctl --server URL` talks to the real API service process."""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlmctl.cli import contexts
from dlmctl.cli.backends import get_backend
from dlmctl.operator.jobs import ANNOTATION_CANCEL
from cli_runs import assert_user_error, run
# The same experiment, status and pods as the kubernetes backend's tests.
from kube_objects import NAME, RUNS, master_pod, spec_text, write_status

TOKEN = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2Vu.c2lnbmF0dXJl"  # a made-up token; it must never be printed


@pytest.fixture(autouse=True)
def home(fresh_home, monkeypatch):
    monkeypatch.delenv(contexts.CONFIG_ENV, raising=False)
    monkeypatch.delenv(contexts.TOKEN_ENV, raising=False)
    return fresh_home


@pytest.fixture
def config_file(home) -> Path:
    return home / "config.yaml"


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch) -> Path:
    """A kubeconfig with two contexts (nothing listens at its server: choosing a backend connects to nothing)."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "lab",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "kube-token"}}],
        "contexts": [{"name": "lab", "context": {"cluster": "c", "user": "u", "namespace": "lab-ns"}},
                     {"name": "prod", "context": {"cluster": "c", "user": "u"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def set_token(capsys, monkeypatch, name: str, token: str = TOKEN):
    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
    return run(capsys, "config", "set-token", name)


def configure(capsys, monkeypatch, *contexts_argv: list[str], use: str | None = None):
    for argv in contexts_argv:
        code, _, err = run(capsys, "config", "set-context", *argv)
        assert code == 0, err
    if use:
        assert run(capsys, "config", "use-context", use)[0] == 0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- the config file ------------------------------------------------------------------------------

def test_the_config_file_is_created_with_mode_0600_whatever_the_umask(capsys, config_file):
    previous = os.umask(0)
    try:
        code, out, err = run(capsys, "config", "set-context", "team", "--backend", "service",
                             "--server", "https://dlmctl.example.org/", "-n", "team-a")
    finally:
        os.umask(previous)
    assert code == 0, err
    assert f"context team created in {config_file} (the current context)" in out
    assert mode(config_file) == 0o600
    assert yaml.safe_load(config_file.read_text()) == {
        "current-context": "team",
        "contexts": {"team": {"backend": "service", "server": "https://dlmctl.example.org", "namespace": "team-a"}}}


def test_every_write_replaces_the_whole_file_at_once_and_leaves_no_partial_file(capsys, monkeypatch, config_file):
    configure(capsys, monkeypatch, ["team", "--backend", "service", "--server", "https://a.example"])
    before = config_file.stat().st_ino
    assert set_token(capsys, monkeypatch, "team")[0] == 0
    assert config_file.stat().st_ino != before, "written to a new file and renamed over the old one"
    assert mode(config_file) == 0o600
    assert [p.name for p in config_file.parent.iterdir()] == ["config.yaml"]


def test_a_write_that_fails_leaves_the_old_file_as_it_was(capsys, monkeypatch, config_file):
    configure(capsys, monkeypatch, ["team", "--backend", "service", "--server", "https://a.example"])
    old = config_file.read_bytes()

    def no_rename(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    code, _, err = run(capsys, "config", "set-context", "other", "--backend", "local")
    assert_user_error(code, err, f"{config_file}: cannot write the dlmctl config (No space left on device)")
    assert config_file.read_bytes() == old
    assert [p.name for p in config_file.parent.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize("wide", [0o644, 0o640, 0o604, 0o660, 0o666])
@pytest.mark.parametrize("argv", [["config", "get-contexts"], ["list"], ["config", "set-context", "x",
                                                                          "--backend", "local"]])
def test_a_config_file_others_may_read_or_write_is_refused(capsys, monkeypatch, config_file, wide, argv):
    configure(capsys, monkeypatch, ["team", "--backend", "service", "--server", "https://a.example"])
    config_file.chmod(wide)
    old = config_file.read_bytes()
    code, out, err = run(capsys, *argv)
    assert_user_error(code, err, str(config_file), f"mode {wide:04o}", "chmod 600")
    assert config_file.read_bytes() == old and mode(config_file) == wide


def test_dlmctl_config_names_another_file(capsys, monkeypatch, tmp_path, home):
    other = tmp_path / "elsewhere" / "dlmctl.yaml"
    monkeypatch.setenv(contexts.CONFIG_ENV, str(other))
    configure(capsys, monkeypatch, ["laptop", "--backend", "local"])
    assert mode(other) == 0o600 and not home.exists()


def test_a_broken_config_file_is_one_line_naming_it(capsys, config_file):
    config_file.parent.mkdir()
    config_file.write_text("contexts:\n  team: {backend: cloud}\n")
    config_file.chmod(0o600)
    code, _, err = run(capsys, "list")
    assert_user_error(code, err, str(config_file), "contexts.team.backend: must be one of local, kubernetes, service")


# ---- the token ----------------------------------------------------------------------------------

def test_the_token_is_read_from_standard_input_and_never_printed(capsys, monkeypatch, config_file):
    configure(capsys, monkeypatch, ["team", "--backend", "service", "--server", "https://a.example", "-n", "t"],
              ["laptop", "--backend", "local"])
    code, out, err = set_token(capsys, monkeypatch, "team")
    assert code == 0, err
    assert TOKEN not in out + err
    assert yaml.safe_load(config_file.read_text())["contexts"]["team"]["token"] == TOKEN

    code, out, err = run(capsys, "config", "get-contexts")
    assert code == 0 and TOKEN not in out + err
    rows = {line.split()[1 if line.startswith("*") else 0]: line for line in out.splitlines()[1:]}
    assert rows["team"].split()[-1] == "set" and rows["team"].startswith("*")
    assert "https://a.example" in rows["team"] and "laptop" in rows


def test_no_command_takes_a_token_on_its_command_line(capsys, monkeypatch):
    configure(capsys, monkeypatch, ["team", "--backend", "service", "--server", "https://a.example"])
    code, _, err = run(capsys, "config", "set-token", "team", TOKEN)
    assert_user_error(code, err, "unexpected extra argument")
    for argv in (["--token", TOKEN, "list"], ["list", "--token", TOKEN],
                 ["config", "set-context", "team", "--token", TOKEN]):
        code, _, err = run(capsys, *argv)
        assert_user_error(code, err, "No such option: --token")
        assert TOKEN not in err


def test_set_token_from_a_pipe_in_a_real_process(home, tmp_path):
    env = {**os.environ, "DLMCTL_HOME": str(home), "KUBECONFIG": str(tmp_path / "none")}
    dlmctl = [sys.executable, "-m", "dlmctl.cli.app"]
    subprocess.run([*dlmctl, "config", "set-context", "team", "--backend", "service", "--server", "https://a.example"],
                   env=env, check=True, capture_output=True)
    done = subprocess.run([*dlmctl, "config", "set-token", "team"], input=TOKEN + "\n", env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    assert yaml.safe_load((home / "config.yaml").read_text())["contexts"]["team"]["token"] == TOKEN


def test_an_empty_token_is_refused(capsys, monkeypatch):
    configure(capsys, monkeypatch, ["team", "--backend", "service", "--server", "https://a.example"])
    code, _, err = set_token(capsys, monkeypatch, "team", "  ")
    assert_user_error(code, err, "the token read from standard input is empty")


def test_only_a_service_context_has_a_token(capsys, monkeypatch):
    configure(capsys, monkeypatch, ["laptop", "--backend", "local"])
    code, _, err = set_token(capsys, monkeypatch, "laptop")
    assert_user_error(code, err, "context 'laptop' uses the local backend; only a service context has a token")


def test_a_new_server_drops_the_old_servers_token(capsys, monkeypatch, config_file):
    configure(capsys, monkeypatch, ["team", "--backend", "service", "--server", "https://a.example"])
    set_token(capsys, monkeypatch, "team")
    configure(capsys, monkeypatch, ["team", "-n", "other"])
    assert yaml.safe_load(config_file.read_text())["contexts"]["team"]["token"] == TOKEN  # other settings keep it
    configure(capsys, monkeypatch, ["team", "--server", "https://b.example"])
    assert "token" not in yaml.safe_load(config_file.read_text())["contexts"]["team"]


# ---- managing contexts ----------------------------------------------------------------------------

def test_use_current_and_delete_context(capsys, monkeypatch):
    code, _, err = run(capsys, "config", "current-context")
    assert_user_error(code, err, "no current context")
    configure(capsys, monkeypatch, ["laptop", "--backend", "local"],
              ["team", "--backend", "service", "--server", "https://a.example"])
    assert run(capsys, "config", "current-context")[1] == "laptop\n"  # the first one made
    assert run(capsys, "config", "use-context", "team")[0] == 0
    assert run(capsys, "config", "current-context")[1] == "team\n"
    code, _, err = run(capsys, "config", "use-context", "prod")
    assert_user_error(code, err, "no context named 'prod'", "laptop, team")
    assert run(capsys, "config", "delete-context", "team")[0] == 0
    assert_user_error(*run(capsys, "config", "current-context")[::2], "no current context")
    assert "team" not in run(capsys, "config", "get-contexts")[1]


@pytest.mark.parametrize("argv, fragments", [
    (["new"], ["--backend: context 'new' is new"]),
    (["s", "--backend", "service"], ["--server: a service context needs the service's URL"]),
    (["s", "--backend", "service", "--server", "dlmctl.example.org"], ["--server: 'dlmctl.example.org' is not"]),
    (["l", "--backend", "local", "-n", "team"], ["--namespace: a local context has no such setting"]),
    (["k", "--backend", "kubernetes", "--server", "https://a"], ["--server: a kubernetes context has no such"]),
    (["s", "--backend", "service", "--server", "https://a", "--ca-file", "/no/ca.pem"], ["--ca-file: /no/ca.pem"]),
    (["x", "--backend", "cloud"], ["'cloud' is not one of 'local', 'kubernetes', 'service'"]),
])
def test_set_context_refuses_what_the_backend_has_not(capsys, argv, fragments, home):
    code, _, err = run(capsys, "config", "set-context", *argv)
    assert_user_error(code, err, *fragments)
    assert not home.exists()


# ---- which backend a command uses -------------------------------------------------------------------

def chosen(**options):
    backend = get_backend(options.pop("backend", None), **options)
    where = {"local": lambda b: None, "kubernetes": lambda b: b.context,
             "service": lambda b: b.server}[backend.name](backend)
    return backend.name, where, getattr(backend, "namespace", None)


def authorization(backend) -> str | None:
    return backend._http.headers.get("Authorization")


@pytest.fixture
def contexts_set(capsys, monkeypatch, kubeconfig):
    configure(capsys, monkeypatch,
              ["team", "--backend", "service", "--server", "https://a.example", "-n", "team-a"],
              ["lab", "--backend", "kubernetes", "--kube-context", "prod", "-n", "lab-team"],
              ["laptop", "--backend", "local"], use="team")
    set_token(capsys, monkeypatch, "team")


def test_without_contexts_a_configured_cluster_else_local(tmp_path, monkeypatch, kubeconfig):
    assert chosen() == ("kubernetes", "lab", "lab-ns")
    assert chosen(namespace="x") == ("kubernetes", "lab", "x")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    assert chosen() == ("local", None, None)


def test_the_current_context_decides_when_nothing_else_does(contexts_set, capsys, monkeypatch):
    assert chosen() == ("service", "https://a.example", "team-a")
    assert authorization(get_backend()) == f"Bearer {TOKEN}"
    configure(capsys, monkeypatch, use="lab")
    assert chosen() == ("kubernetes", "prod", "lab-team")
    configure(capsys, monkeypatch, use="laptop")
    assert chosen() == ("local", None, None)


def test_the_command_line_chooses_over_the_environment_over_the_current_context(contexts_set, monkeypatch):
    assert chosen(namespace="b") == ("service", "https://a.example", "b")  # -n alone: the context's backend
    assert chosen(backend="local") == ("local", None, None)
    assert chosen(backend="kubernetes") == ("kubernetes", "lab", "lab-ns")  # not the service context's namespace
    assert chosen(context="lab") == ("kubernetes", "prod", "lab-team")  # a dlmctl context
    assert chosen(context="lab", namespace="x") == ("kubernetes", "prod", "x")
    assert chosen(context="prod") == ("kubernetes", "prod", "default")  # else a kubeconfig context
    assert chosen(context="laptop") == ("local", None, None)
    monkeypatch.setenv("DLMCTL_BACKEND", "local")
    assert chosen() == ("local", None, None)
    assert chosen(server="https://b.example") == ("service", "https://b.example", "default")
    assert chosen(context="team") == ("service", "https://a.example", "team-a")
    assert chosen(backend="kubernetes") == ("kubernetes", "lab", "lab-ns")


def test_the_token_comes_from_the_environment_else_the_context_of_that_server(contexts_set, monkeypatch):
    assert authorization(get_backend(server="https://a.example/")) == f"Bearer {TOKEN}"  # the same server
    assert chosen(server="https://a.example/") == ("service", "https://a.example", "team-a")
    other = get_backend(server="https://b.example")
    assert authorization(other) is None, "a context's token only goes to its own server"
    assert other.namespace == "default"
    monkeypatch.setenv(contexts.TOKEN_ENV, "from-env")
    assert authorization(get_backend()) == "Bearer from-env"
    assert authorization(get_backend(server="https://b.example")) == "Bearer from-env"


@pytest.mark.parametrize("options, fragments", [
    ({"backend": "kubernetes", "server": "https://a"}, ["--server: the kubernetes backend has no server"]),
    ({"backend": "service"}, ["the service backend needs the service's URL", "--server URL"]),
    ({"backend": "service", "context": "prod"}, ["--context: 'prod' is no dlmctl context"]),
    ({"server": "ftp://a"}, ["--server: 'ftp://a' is not an http:// or https:// URL"]),
])
def test_what_cannot_be_combined_is_one_line(capsys, kubeconfig, options, fragments):
    from dlmctl.cli.errors import UserError

    with pytest.raises(UserError) as err:
        get_backend(options.pop("backend", None), **options)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_server_works_before_and_after_the_command(capsys, home):
    """Nothing listens on port 1: the error shows which server was asked, wherever --server was given."""
    for argv in (["--server", "http://127.0.0.1:1", "list"], ["list", "--server", "http://127.0.0.1:1"]):
        code, _, err = run(capsys, *argv)
        assert_user_error(code, err, "cannot reach the dlmctl service http://127.0.0.1:1: connection refused")
    assert not home.exists()


# ---- against the real API service ----------------------------------------------------------------------
# `python -m dlmctl.service` as tests/service_harness.py runs it (conftest's `service`), on the test control
# plane; the researcher's token (a ServiceAccount with a Role on Experiments in its namespace) in $DLMCTL_TOKEN.
# What `--server` prints is what `--backend kubernetes` prints for the same experiment.

@pytest.fixture
def researcher(cluster, cluster_namespace, service, kube, monkeypatch) -> str:
    """$DLMCTL_TOKEN: a token allowed to use Experiments in cluster_namespace only."""
    from service_harness import grant_experiments

    token = grant_experiments(cluster, cluster_namespace)
    monkeypatch.setenv(contexts.TOKEN_ENV, token)
    return token


@pytest.fixture
def scarce(tmp_path, s3_uri) -> Path:
    path = tmp_path / "scarce.yaml"
    path.write_text(spec_text(uri=s3_uri))
    return path


def both(capsys, service, namespace, *argv):
    """The same command through the service and straight to the cluster: (code, stdout) of each."""
    through = run(capsys, *argv, "--server", service.url, "-n", namespace)
    direct = run(capsys, *argv, "--backend", "kubernetes", "-n", namespace)
    return through[:2], direct[:2], through[2]


def evals(*losses):
    return "".join(json.dumps({"event": "eval", "time": 3.0 + i, "step": 16 * (i + 1), "total_steps": 64,
                               "epoch": float(i + 1), "tokens": 131072 * (i + 1), "val_loss": loss}) + "\n"
                   for i, loss in enumerate(losses)).encode()


@pytest.mark.cluster
@pytest.mark.s3
def test_through_the_service_every_verb_prints_what_the_kubernetes_backend_prints(
        capsys, service, researcher, kube, cluster_namespace, scarce, s3_server, s3_uri):
    custom, _ = kube
    code, out, err = run(capsys, "--server", service.url, "-n", cluster_namespace, "submit", scarce)
    assert code == 0, err
    assert f"submitting experiment {NAME} to the service backend: {service.url}, namespace {cluster_namespace}" in out
    assert f"2 runs submitted: {', '.join(RUNS)}" in out
    assert custom.get_namespaced_custom_object("dlmctl.io", "v1alpha1", cluster_namespace, "experiments", NAME)

    write_status(custom, cluster_namespace, {"phase": "Running", "progress": "0/2", "runs": [
        {"name": "scarce-dlm", "arm": "diffusion", "phase": "Running", "step": 48, "total_steps": 64,
         "train_loss": 4.5},
        {"name": "scarce-ar", "arm": "autoregressive", "phase": "Unschedulable", "reason": "Unschedulable",
         "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]})
    fs = s3_server.filesystem()
    fs.pipe(f"{s3_uri}/scarce-dlm/metrics.jsonl", evals(6.0, 5.0, 4.0))
    fs.pipe(f"{s3_uri}/scarce-ar/metrics.jsonl", evals(5.5, 5.25, 5.75))

    for argv in (["get", NAME], ["get", NAME, "-o", "json"], ["get", NAME, "-o", "yaml"], ["list", "-o", "json"],
                 ["compare", NAME], ["logs", NAME]):
        through, direct, err = both(capsys, service, cluster_namespace, *argv)
        assert through == direct, (argv, err)
        assert through[0] == 0
    through, _, _ = both(capsys, service, cluster_namespace, "compare", NAME)
    assert "crossover" in through[1] and "4.000" in through[1]

    code, out, err = run(capsys, "--server", service.url, "-n", cluster_namespace, "cancel", NAME)
    assert (code, out) == (0, f"experiment {NAME} cancelled\n"), err
    annotations = custom.get_namespaced_custom_object("dlmctl.io", "v1alpha1", cluster_namespace, "experiments",
                                                      NAME)["metadata"]["annotations"]
    assert ANNOTATION_CANCEL in annotations, "asked of the operator as the kubernetes backend asks it"

    code, _, err = run(capsys, "--server", service.url, "-n", cluster_namespace, "submit", scarce)
    assert_user_error(code, err, f"experiment '{NAME}' already exists in namespace '{cluster_namespace}'", "--replace")
    code, _, err = run(capsys, "--server", service.url, "-n", cluster_namespace, "get", "nope")
    assert_user_error(code, err, "no experiment named 'nope'", cluster_namespace)


@pytest.mark.cluster
@pytest.mark.s3
def test_logs_through_the_service_are_the_master_pods(capsys, service, researcher, kube, cluster_namespace, scarce,
                                                      pod_executor):
    _, core = kube
    assert run(capsys, "--server", service.url, "-n", cluster_namespace, "submit", scarce)[0] == 0
    pod = master_pod(core, cluster_namespace, "scarce-dlm", "diffusion", "print('step 1'); print('step 2')")
    pod_executor.wait_exited(cluster_namespace, pod)
    for argv in (["logs", NAME, "--run", "scarce-dlm"], ["logs", NAME]):
        through, direct, err = both(capsys, service, cluster_namespace, *argv)
        assert through == direct and through[0] == 0, err
    assert through[1] == "[scarce-dlm] step 1\n[scarce-dlm] step 2\n"
    assert err == "scarce-ar: no log yet (run Pending)\n"


@pytest.mark.cluster
@pytest.mark.s3
def test_another_namespace_is_forbidden_in_one_line(capsys, service, researcher, cluster_namespace, scarce):
    for argv, verb in ((["list"], "list"), (["get", NAME], "get"), (["submit", scarce], "create")):
        code, _, err = run(capsys, "--server", service.url, "-n", "kube-system", *argv)
        assert_user_error(code, err, f"permission denied: not allowed to {verb} experiments in namespace "
                                     "'kube-system'", service.url)


@pytest.mark.cluster
@pytest.mark.s3
def test_a_refused_or_missing_token_is_one_line(capsys, service, researcher, cluster_namespace, monkeypatch):
    monkeypatch.setenv(contexts.TOKEN_ENV, "not-a-token")
    code, _, err = run(capsys, "--server", service.url, "-n", cluster_namespace, "list")
    assert_user_error(code, err, f"unauthorized: the server {service.url} refused the token (from $DLMCTL_TOKEN)")
    assert "not-a-token" not in err
    monkeypatch.delenv(contexts.TOKEN_ENV)
    code, _, err = run(capsys, "--server", service.url, "-n", cluster_namespace, "list")
    assert_user_error(code, err, f"unauthorized: {service.url} needs a token", "DLMCTL_TOKEN")


@pytest.mark.cluster
@pytest.mark.s3
def test_a_context_with_a_stored_token_is_all_a_command_needs(capsys, service, researcher, cluster_namespace,
                                                              scarce, monkeypatch):
    monkeypatch.delenv(contexts.TOKEN_ENV)
    configure(capsys, monkeypatch, ["team", "--backend", "service", "--server", service.url, "-n", cluster_namespace])
    assert set_token(capsys, monkeypatch, "team", researcher)[0] == 0
    code, out, err = run(capsys, "submit", scarce)
    assert code == 0 and f"{service.url}, namespace {cluster_namespace}" in out, err
    code, out, err = run(capsys, "list", "-o", "json")
    assert code == 0 and [e["name"] for e in json.loads(out)] == [NAME], err


@pytest.mark.cluster
def test_tls_is_verified_and_a_context_may_name_the_ca(capsys, cluster, monkeypatch, tmp_path):
    """The API server is a real TLS server with the test CA: untrusted by default, trusted with the context's
    ca-file -- and then it is plainly not a dlmctl service."""
    import base64

    kubeconfig = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    entry = kubeconfig["clusters"][0]["cluster"]
    ca = tmp_path / "ca.pem"
    ca.write_bytes(base64.b64decode(entry["certificate-authority-data"]))
    server = entry["server"]
    code, _, err = run(capsys, "--server", server, "list")
    assert_user_error(code, err, f"cannot reach the dlmctl service {server}: its TLS certificate is not trusted")
    configure(capsys, monkeypatch, ["api", "--backend", "service", "--server", server, "--ca-file", ca], use="api")
    code, _, err = run(capsys, "list")
    assert_user_error(code, err, f"{server} answered 40", "is it a dlmctl service?")
