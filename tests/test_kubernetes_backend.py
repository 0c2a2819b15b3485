"""The kubernetes backend against a real API server: `dlmctl submit/list/get/logs/cancel/compare` create
and read `Experiment` objects as the operator expects them, and every failure is one clear line."""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from dlmctl.cli.app import main
from dlmctl.operator.jobs import ANNOTATION_CANCEL
from dlmctl.spec import experiment_from_dict
from cli_runs import assert_user_error, run
from kube_objects import NAME, RUNS, experiments, master_pod, read, spec_text, write_status

pytestmark = pytest.mark.cluster


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "scarce.yaml"
    path.write_text(spec_text())
    return path


# ---- submit --------------------------------------------------------------------------------------

def test_submit_creates_the_experiment_as_specified_and_says_where(capsys, kube, cluster_namespace, spec):
    custom, _ = kube
    code, out, err = run(capsys, "submit", spec, "-n", cluster_namespace)
    assert code == 0, err
    assert "kubernetes backend" in out and "context dlmctl-testenv" in out
    assert f"namespace {cluster_namespace}" in out
    assert all(r in out for r in RUNS)

    obj = read(custom, cluster_namespace)
    expected = experiment_from_dict(yaml.safe_load(spec.read_text())).model_dump(
        mode="json", exclude_none=True, exclude={"status"})
    assert obj["spec"] == expected["spec"]
    assert obj["metadata"]["labels"] == {"team": "scarcity"}
    assert obj["metadata"]["namespace"] == cluster_namespace
    assert "status" not in obj, "the status is the operator's to write"


def test_submit_again_needs_replace_and_replace_makes_a_new_object(capsys, kube, cluster_namespace, spec):
    custom, _ = kube
    assert run(capsys, "submit", spec, "-n", cluster_namespace)[0] == 0
    first = read(custom, cluster_namespace)["metadata"]["uid"]

    code, _, err = run(capsys, "submit", spec, "-n", cluster_namespace)
    assert_user_error(code, err, f"experiment '{NAME}' already exists", "--replace")
    assert read(custom, cluster_namespace)["metadata"]["uid"] == first

    code, out, err = run(capsys, "submit", spec, "--replace", "-n", cluster_namespace)
    assert code == 0, err
    assert read(custom, cluster_namespace)["metadata"]["uid"] != first
    assert len(experiments(custom, cluster_namespace)) == 1


def test_a_cluster_run_needs_an_s3_checkpoint_uri_and_nothing_is_created(capsys, kube, cluster_namespace, tmp_path):
    custom, _ = kube
    local = tmp_path / "local.yaml"
    local.write_text(spec_text(uri=None))
    code, _, err = run(capsys, "submit", local, "-n", cluster_namespace)
    assert_user_error(code, err, "spec.checkpoint.uri: a cluster run needs an s3:// URI", "--backend local")
    assert experiments(custom, cluster_namespace) == []


def test_backend_context_and_namespace_options_work_after_the_command(capsys, kube, cluster_namespace, spec,
                                                                      monkeypatch):
    custom, _ = kube
    monkeypatch.setenv("DLMCTL_BACKEND", "local")  # the option after the command wins over the environment
    code, out, err = run(capsys, "submit", spec, "--backend", "kubernetes", "--context", "dlmctl-testenv",
                         "--namespace", cluster_namespace)
    assert code == 0, err
    assert "kubernetes backend" in out and len(experiments(custom, cluster_namespace)) == 1
    code, out, err = run(capsys, "get", NAME, "--backend", "kubernetes", "-n", cluster_namespace)
    assert code == 0 and "scarce-dlm" in out, err


def test_the_namespace_is_the_contexts_else_default(capsys, kube, cluster, cluster_namespace, spec, tmp_path,
                                                    monkeypatch):
    from dlmctl.cli.backends.kubernetes import KubernetesBackend

    custom, _ = kube
    assert KubernetesBackend().namespace == "default"  # the admin context names no namespace
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config["contexts"][0]["context"]["namespace"] = cluster_namespace
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    code, out, err = run(capsys, "submit", spec)
    assert code == 0 and f"namespace {cluster_namespace}" in out, err
    assert len(experiments(custom, cluster_namespace)) == 1


# ---- list / get ----------------------------------------------------------------------------------

def test_get_before_the_operator_wrote_a_status_shows_every_run_pending(capsys, kube, cluster_namespace, spec):
    assert run(capsys, "submit", spec, "-n", cluster_namespace)[0] == 0
    code, out, err = run(capsys, "get", NAME, "-n", cluster_namespace, "-o", "json")
    assert code == 0, err
    status = json.loads(out)["status"]
    assert status["phase"] == "Pending" and status["progress"] == "0/2"
    assert [(r["name"], r["phase"]) for r in status["runs"]] == [(r, "Pending") for r in RUNS]


def test_list_and_get_show_the_status_the_operator_wrote(capsys, kube, cluster_namespace, spec):
    custom, _ = kube
    assert run(capsys, "submit", spec, "-n", cluster_namespace)[0] == 0
    unschedulable = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    write_status(custom, cluster_namespace, {
        "phase": "Running", "progress": "0/2",
        "runs": [
            {"name": "scarce-dlm", "arm": "diffusion", "phase": "Unschedulable", "reason": "Unschedulable",
             "message": unschedulable},
            {"name": "scarce-ar", "arm": "autoregressive", "phase": "Running", "step": 40, "total_steps": 128,
             "epoch": 1.25, "train_loss": 4.5, "restarts": 2},
        ],
    })

    code, out, err = run(capsys, "get", NAME, "-n", cluster_namespace)
    assert code == 0, err
    assert "Unschedulable" in out and "Insufficient nvidia.com/gpu" in out
    assert "40/128" in out and "4.500" in out
    restarts_row = next(line for line in out.splitlines() if "scarce-ar" in line)
    assert " 2 " in restarts_row

    code, out, err = run(capsys, "list", "-n", cluster_namespace)
    assert code == 0, err
    assert NAME in out and "Running" in out and "0/2" in out
    code, out, err = run(capsys, "list", "-n", cluster_namespace, "-o", "json")
    (summary,) = json.loads(out)
    assert (summary["name"], summary["phase"], summary["runs"], summary["namespace"]) == (
        NAME, "Running", 2, cluster_namespace)
    assert datetime.fromisoformat(summary["created"]).tzinfo is not None

    code, out, err = run(capsys, "list", "-A")
    assert code == 0 and "NAMESPACE" in out and cluster_namespace in out, err


def test_get_of_an_unknown_experiment_is_one_line(capsys, kube, cluster_namespace):
    code, _, err = run(capsys, "get", "nope", "-n", cluster_namespace)
    assert_user_error(code, err, "no experiment named 'nope'", cluster_namespace)


# ---- cancel, logs, compare -----------------------------------------------------------------------

def test_cancel_asks_the_operator_through_the_annotation(capsys, kube, cluster_namespace, spec):
    custom, _ = kube
    assert run(capsys, "submit", spec, "-n", cluster_namespace)[0] == 0
    code, out, err = run(capsys, "cancel", NAME, "-n", cluster_namespace)
    assert code == 0 and "cancelled" in out, err
    requested = read(custom, cluster_namespace)["metadata"]["annotations"][ANNOTATION_CANCEL]
    assert abs(time.time() - datetime.fromisoformat(requested.replace("Z", "+00:00")).timestamp()) < 60

    write_status(custom, cluster_namespace, {"phase": "Cancelled", "runs": [
        {"name": r, "arm": a, "phase": "Cancelled"} for r, a in zip(RUNS, ("diffusion", "autoregressive"))]})
    code, out, _ = run(capsys, "cancel", NAME, "-n", cluster_namespace)
    assert code == 0 and "already finished (Cancelled)" in out


def test_logs_of_runs_without_pods_say_so(capsys, kube, cluster_namespace, spec):
    assert run(capsys, "submit", spec, "-n", cluster_namespace)[0] == 0
    code, out, err = run(capsys, "logs", NAME, "-n", cluster_namespace)
    assert code == 0 and out == ""
    assert [line.split(":")[0] for line in err.splitlines()] == RUNS
    assert "no pod yet (run Pending)" in err
    code, _, err = run(capsys, "logs", NAME, "--run", "scarce-xx", "-n", cluster_namespace)
    assert_user_error(code, err, "has no run 'scarce-xx'")


def test_logs_show_the_master_pod_of_each_run(capsys, kube, cluster_namespace, spec, pod_executor):
    _, core = kube
    assert run(capsys, "submit", spec, "-n", cluster_namespace)[0] == 0
    pod = master_pod(core, cluster_namespace, "scarce-dlm", "diffusion", "print('step 1'); print('step 2')")
    master_pod(core, cluster_namespace, "scarce-dlm", "diffusion", "print('a worker')", replica_type="worker")
    pod_executor.wait_exited(cluster_namespace, pod)

    code, out, err = run(capsys, "logs", NAME, "--run", "scarce-dlm", "-n", cluster_namespace)
    assert (code, out, err) == (0, "step 1\nstep 2\n", "")
    code, out, err = run(capsys, "logs", NAME, "-n", cluster_namespace)
    assert code == 0 and out == "[scarce-dlm] step 1\n[scarce-dlm] step 2\n"
    assert err == "scarce-ar: no pod yet (run Pending)\n"


def test_following_logs_streams_until_the_run_ends(capsys, kube, cluster_namespace, spec, pod_executor, monkeypatch):
    import threading

    import dlmctl.operator.client as experiment_client

    custom, core = kube
    monkeypatch.setattr(experiment_client, "FOLLOW_POLL_SECONDS", 0.2)
    assert run(capsys, "submit", spec, "-n", cluster_namespace)[0] == 0
    result = {}
    follower = threading.Thread(target=lambda: result.update(
        code=main(["logs", NAME, "-f", "--run", "scarce-ar", "-n", cluster_namespace])))
    follower.start()
    time.sleep(1)
    pod = master_pod(core, cluster_namespace, "scarce-ar", "autoregressive",
                     "import time\nfor i in range(6): print(f'step {i}', flush=True); time.sleep(0.5)")
    pod_executor.wait_exited(cluster_namespace, pod)
    time.sleep(1)
    assert follower.is_alive(), "follows until the run has ended, not its pod"
    write_status(custom, cluster_namespace, {"phase": "Running", "runs": [
        {"name": "scarce-ar", "arm": "autoregressive", "phase": "Succeeded"}]})
    follower.join(timeout=30)
    assert not follower.is_alive() and result["code"] == 0
    out, err = capsys.readouterr()
    assert out == "".join(f"step {i}\n" for i in range(6))
    assert err == "scarce-ar: no pod yet; waiting (run Pending)\n"


def test_following_logs_ends_when_the_runs_end(capsys, kube, cluster_namespace, spec, monkeypatch):
    import threading

    import dlmctl.operator.client as experiment_client

    custom, _ = kube
    monkeypatch.setattr(experiment_client, "FOLLOW_POLL_SECONDS", 0.2)
    assert run(capsys, "submit", spec, "-n", cluster_namespace)[0] == 0
    result = {}
    follower = threading.Thread(target=lambda: result.update(code=main(["logs", NAME, "-f", "-n", cluster_namespace])))
    follower.start()
    time.sleep(2)
    assert follower.is_alive(), "follows while the runs are not finished"
    write_status(custom, cluster_namespace, {"phase": "Cancelled", "runs": [
        {"name": r, "arm": a, "phase": "Cancelled", "message": "cancelled"}
        for r, a in zip(RUNS, ("diffusion", "autoregressive"))]})
    follower.join(timeout=30)
    assert not follower.is_alive() and result["code"] == 0
    err = capsys.readouterr().err
    for r in RUNS:
        assert f"{r}: no pod yet; waiting (run Pending)" in err
        assert f"{r}: run Cancelled: cancelled; it left no pod to show" in err


def test_compare_falls_back_to_the_status_when_the_store_cannot_be_read(capsys, kube, cluster_namespace, tmp_path):
    custom, _ = kube
    unreachable = tmp_path / "unreachable.yaml"
    unreachable.write_text(spec_text(endpoint="http://127.0.0.1:1"))
    assert run(capsys, "submit", unreachable, "-n", cluster_namespace)[0] == 0
    write_status(custom, cluster_namespace, {"phase": "Running", "runs": [
        {"name": "scarce-dlm", "arm": "diffusion", "phase": "Running", "train_loss": 5.25, "val_loss": 5.5},
        {"name": "scarce-ar", "arm": "autoregressive", "phase": "Running", "train_loss": 0.125}]})
    code, out, err = run(capsys, "compare", NAME, "-n", cluster_namespace)
    assert code == 0
    assert "5.250" in out and "5.500" in out and "0.125" in out
    assert err.count("\n") == 1 and "cannot read s3://ckpt/scarce/scarce-dlm/metrics.jsonl" in err
    assert "showing the progress the operator last recorded" in err


@pytest.mark.s3
def test_compare_reads_each_runs_metrics_from_its_store(capsys, kube, cluster_namespace, tmp_path, s3_server, s3_uri):
    custom, _ = kube
    path = tmp_path / "s3.yaml"
    path.write_text(spec_text(uri=s3_uri))
    assert run(capsys, "submit", path, "-n", cluster_namespace)[0] == 0
    write_status(custom, cluster_namespace, {"phase": "Running", "runs": [
        {"name": "scarce-dlm", "arm": "diffusion", "phase": "Running", "train_loss": 9.0}]})
    events = [{"event": "start", "time": 1.0, "step": 0, "total_steps": 64, "world_size": 16, "parameters": 10,
               "unigram_entropy": 5.75},
              {"event": "train", "time": 2.0, "step": 32, "total_steps": 64, "epoch": 2.0, "tokens": 262144,
               "train_loss": 4.125},
              {"event": "eval", "time": 3.0, "step": 32, "total_steps": 64, "epoch": 2.0, "tokens": 262144,
               "val_loss": 4.625}]
    s3_server.filesystem().pipe(f"{s3_uri}/scarce-dlm/metrics.jsonl",
                                "".join(json.dumps(e) + "\n" for e in events).encode())
    code, out, err = run(capsys, "compare", NAME, "-n", cluster_namespace)
    assert code == 0 and err == "", err
    dlm = next(line for line in out.splitlines() if "scarce-dlm" in line)
    assert "4.125" in dlm and "4.625" in dlm and "262k" in dlm and "2.00" in dlm and "9.000" not in dlm
    assert "unigram entropy of the training tokens: 5.75" in out


@pytest.mark.s3
def test_artifacts_of_a_cluster_run_are_fetched_into_a_local_folder(kube, cluster_namespace, tmp_path, s3_server,
                                                                    s3_uri, isolated_home, capsys):
    from dlmctl.cli.backends.kubernetes import KubernetesBackend

    path = tmp_path / "s3.yaml"
    path.write_text(spec_text(uri=s3_uri))
    assert run(capsys, "submit", path, "-n", cluster_namespace)[0] == 0
    backend = KubernetesBackend(namespace=cluster_namespace)
    with pytest.raises(Exception, match="has no tokenizer.json yet"):
        backend.artifacts("scarce-dlm")

    fs = s3_server.filesystem()
    fs.pipe(f"{s3_uri}/scarce-dlm/tokenizer.json", b'{"tokenizer": 1}')
    fs.pipe(f"{s3_uri}/scarce-dlm/metrics.jsonl", b'{"event": "start"}\n')
    folder = Path(backend.artifacts("scarce-dlm"))
    assert folder == isolated_home / "clusters" / "dlmctl-testenv" / cluster_namespace / "scarce-dlm"
    expected = experiment_from_dict(yaml.safe_load(path.read_text())).runs()[0]
    assert json.loads((folder / "run.json").read_text()) == json.loads(
        expected.model_copy(update={"namespace": cluster_namespace}).model_dump_json())
    assert (folder / "tokenizer.json").read_bytes() == b'{"tokenizer": 1}'
    assert (folder / "metrics.jsonl").read_bytes() == b'{"event": "start"}\n'

    with pytest.raises(Exception, match="no run named 'scarce-xx'"):
        backend.artifacts("scarce-xx")


# ---- errors --------------------------------------------------------------------------------------

def test_a_service_account_without_rights_is_told_what_it_may_not_do(capsys, kube, cluster, cluster_namespace, spec,
                                                                     monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig_for("nobody", cluster_namespace)))
    code, _, err = run(capsys, "list")
    assert_user_error(code, err, "permission denied", f"system:serviceaccount:{cluster_namespace}:nobody",
                      "may not list experiments.dlmctl.io", f"in namespace '{cluster_namespace}'")
    code, _, err = run(capsys, "submit", spec)
    assert_user_error(code, err, "may not create experiments.dlmctl.io", f"in namespace '{cluster_namespace}'")


def test_a_missing_crd_says_how_to_install_it(capsys, kube, cluster_namespace, monkeypatch):
    import dlmctl.operator.client as experiment_client

    monkeypatch.setattr(experiment_client, "GROUP", "not-installed.dlmctl.io")
    for argv in (["list"], ["get", NAME]):
        code, _, err = run(capsys, *argv, "-n", cluster_namespace)
        assert_user_error(code, err, "is not installed", "kubectl apply -f charts/dlmctl/crds/")


def test_an_unreachable_server_is_named_within_seconds(capsys, kube, cluster, tmp_path, monkeypatch):
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    started = time.monotonic()
    code, _, err = run(capsys, "list")
    assert time.monotonic() - started < 10
    assert_user_error(code, err, "cannot reach the Kubernetes API server https://127.0.0.1:1", "connection refused")


def test_an_unknown_context_lists_the_known_ones(capsys, kube):
    code, _, err = run(capsys, "list", "--context", "nope")
    assert_user_error(code, err, "--context: no context 'nope'", "dlmctl-testenv")


@pytest.mark.slow
@pytest.mark.s3
def test_sample_and_export_a_cluster_run_from_its_store(capsys, kube, cluster_namespace, tmp_path, s3_server, s3_uri,
                                                        isolated_home):
    """`dlmctl sample/export RUN` on a laptop: the run is found in the namespace, its files and checkpoints
    are read from its store. The run here was trained by the real trainer as its pod would have."""
    from trainer_runs import TINY, launch, merge

    document = {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "smp"},
                "spec": merge(TINY, {"arms": ["diffusion"], "checkpoint": {"uri": s3_uri}})}
    (trained,) = experiment_from_dict(document).runs()
    launch(trained, tmp_path / "pod")
    fs, store = s3_server.filesystem(), f"{s3_uri}/{trained.name}"
    if not fs.exists(f"{store}/tokenizer.json"):  # a trainer that does not upload its run files yet
        fs.put_file(str(tmp_path / "pod" / "tokenizer.json"), f"{store}/tokenizer.json")
    path = tmp_path / "smp.yaml"
    path.write_text(yaml.safe_dump(document))
    assert run(capsys, "submit", path, "-n", cluster_namespace)[0] == 0

    code, out, err = run(capsys, "sample", trained.name, "-n", cluster_namespace, "-p", "def ", "--max-new-tokens", 4)
    assert code == 0 and out.endswith("\n") and not err, err  # (what a 1-epoch nano model says is no matter)
    code, out, err = run(capsys, "export", trained.name, "-n", cluster_namespace, "-o", tmp_path / "export")
    assert code == 0, err
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    assert (isolated_home / "clusters" / "dlmctl-testenv" / cluster_namespace / trained.name / "run.json").is_file()
