"""End to end on the test cluster, with nothing faked but the nodes: `dlmctl submit` → Experiment →
the dlmctl operator → PyTorchJobs → the real training-operator → pods on KWOK nodes, whose containers
the test's pod executor runs as local processes → torchrun → the real trainer, two nodes per run over
gloo, checkpoints and metrics to SeaweedFS → `dlmctl get` and `dlmctl compare` read them back.
An evicted pod's run is preempted, recreated, resumes from S3 and ends exactly where an uninterrupted
run ends."""
from __future__ import annotations

import json
import uuid

import pytest
import yaml
from kubernetes import client

from dlmctl.cli.app import main
from operator_harness import (S3_SECRET, Experiments, OperatorProcess, create_namespace_with_s3_secret,
                              install_operator_rbac, wait_until)
from testenv.executor import PodExecutor
from trainer_runs import TINY, merge

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]

TRAINING_TIMEOUT = 600


def cluster_spec(s3_uri: str, endpoint: str, **overrides) -> dict:
    """The tests' tiny trainer spec, on two one-process nodes (world size 2), with S3 checkpoints."""
    return merge(merge(TINY, {
        "data": {"epochs": 6},
        "resources": {"nodes": 2, "gpus_per_node": 0, "cpu": "1", "memory": "2Gi"},
        "checkpoint": {"uri": s3_uri, "interval_steps": 8, "endpoint_url": endpoint,
                       "credentials_secret": S3_SECRET},
        "scheduling": {"max_restarts": 2},
    }), overrides)


def metrics_events(s3_server, s3_uri: str, run: str) -> list[dict]:
    with s3_server.filesystem().open(f"{s3_uri}/{run}/metrics.jsonl", "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(events: list[dict]) -> list[tuple]:
    """What must not depend on how the run was interrupted: every step's loss and every evaluation."""
    return [(e["event"], e["step"], e.get("train_loss"), e.get("val_loss"), e.get("choice_accuracy"))
            for e in events if e["event"] in ("train", "eval")]


@pytest.fixture(scope="module")
def site(cluster, s3_server, tmp_path_factory):
    """A namespace with the S3 credentials Secret, the operator, and the pod executor running its pods."""
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    workdir = tmp_path_factory.mktemp("e2e")
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        create_namespace_with_s3_secret(core, namespace, s3_server)
    operator = OperatorProcess(install_operator_rbac(cluster), workdir / "operator.log",
                               env=s3_server.env()).start()
    executor = PodExecutor(cluster, namespaces={namespace}, workdir=workdir / "pods")
    try:
        with executor:
            yield {"namespace": namespace, "operator": operator, "executor": executor, "workdir": workdir}
            with cluster.api_client() as api:  # while the operator runs: it lets its experiments go
                client.CoreV1Api(api).delete_namespace(namespace)
                experiments = Experiments(api, namespace)
                wait_until("the experiments deleted", lambda: not experiments.custom.list_namespaced_custom_object(
                    "dlmctl.io", "v1alpha1", namespace, "experiments")["items"], timeout=180)
    finally:  # never left running: it would reconcile the experiments of the tests after this module
        operator.stop()


@pytest.fixture(scope="module")
def uninterrupted(cluster, site, s3_server, tmp_path_factory):
    """A 2-arm experiment submitted with `dlmctl submit` and trained to the end."""
    import os

    s3_uri = f"s3://{s3_server.bucket}/e2e-{uuid.uuid4().hex[:8]}"
    spec_file = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({
        "apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "tiny"},
        "spec": {"arms": ["diffusion", "autoregressive"], **cluster_spec(s3_uri, s3_server.endpoint_url)}}))
    env = {"KUBECONFIG": str(cluster.kubeconfig), **s3_server.env()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["submit", str(spec_file), "--backend", "kubernetes", "-n", site["namespace"]]) == 0
        with cluster.api_client() as api:
            experiments = Experiments(api, site["namespace"])
            status = wait_until("tiny Succeeded", lambda: (
                s if (s := experiments.status("tiny")).get("phase") in ("Succeeded", "Failed") else None),
                timeout=TRAINING_TIMEOUT, interval=1, check=site["operator"].check_alive)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + _pod_logs(site)
    return {"s3_uri": s3_uri, "status": status, "env": env}


def _pod_logs(site) -> str:
    return "\n".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((site["workdir"] / "pods").rglob("*.log")))


def test_a_submitted_experiment_trains_on_the_cluster_and_succeeds(uninterrupted, s3_server):
    status = uninterrupted["status"]
    assert status["progress"] == "2/2"
    for run in status["runs"]:
        events = metrics_events(s3_server, uninterrupted["s3_uri"], run["name"])
        done = [e for e in events if e["event"] == "done"]
        assert done and done[-1]["step"] == run["total_steps"] == run["step"], run
        starts = [e for e in events if e["event"] == "start"]
        assert starts[0]["world_size"] == 2, "two pods, one process each"
        assert run["val_loss"] == [e for e in events if e["event"] == "eval"][-1]["val_loss"]
        assert run["last_checkpoint"].startswith(f"{uninterrupted['s3_uri']}/{run['name']}/")
        assert run["restarts"] == 0


def test_compare_prints_the_table_from_the_store(uninterrupted, site, s3_server, capsys, monkeypatch):
    for k, v in uninterrupted["env"].items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert main(["compare", "tiny", "--backend", "kubernetes", "-n", site["namespace"]]) == 0
    out = capsys.readouterr().out
    for run in ("tiny-dlm", "tiny-ar"):
        events = metrics_events(s3_server, uninterrupted["s3_uri"], run)
        val = [e for e in events if e["event"] == "eval"][-1]["val_loss"]
        line = next((line for line in out.splitlines() if f" {run} " in f" {line} "), out)
        assert f"{val:.3f}" in line and "Succeeded" in line, line


def test_an_evicted_run_is_preempted_recreated_and_ends_exactly_like_an_uninterrupted_one(
        uninterrupted, site, cluster, s3_server):
    s3_uri = f"s3://{s3_server.bucket}/e2e-preempt-{uuid.uuid4().hex[:8]}"
    with cluster.api_client() as api:
        experiments = Experiments(api, site["namespace"])
        experiments.create("evicted", {"arms": ["diffusion"], **cluster_spec(s3_uri, s3_server.endpoint_url)})
        check = site["operator"].check_alive
        run = wait_until("a verified checkpoint", lambda: (
            r if (r := experiments.runs("evicted").get("evicted-dlm")) and r.get("last_checkpoint") else None),
            timeout=TRAINING_TIMEOUT, interval=0.5, check=check)
        assert run["phase"] == "Running" and run["step"] < run["total_steps"], "evicted mid-training"
        worker = next(p for p in experiments.pods("evicted-dlm") if "worker" in p.metadata.name)
        experiments.core.create_namespaced_pod_eviction(worker.metadata.name, site["namespace"], client.V1Eviction(
            metadata=client.V1ObjectMeta(name=worker.metadata.name, namespace=site["namespace"])))
        experiments.wait_run("evicted", "evicted-dlm", "Preempted", timeout=60, check=check)
        status = wait_until("evicted finished", lambda: (
            s if (s := experiments.status("evicted")).get("phase") in ("Succeeded", "Failed") else None),
            timeout=TRAINING_TIMEOUT, interval=1, check=check)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + _pod_logs(site)
    (run,) = status["runs"]
    assert run["restarts"] == 1
    events = metrics_events(s3_server, s3_uri, "evicted-dlm")
    assert sum(e["event"] == "start" for e in events) == 2, "trained, stopped, resumed"
    reference = metrics_events(s3_server, uninterrupted["s3_uri"], "tiny-dlm")
    assert curve(events) == curve(reference), "the resumed run's losses equal the uninterrupted run's, bitwise"


def test_a_run_kueue_preempts_for_a_higher_priority_one_resumes_and_ends_exactly_like_an_uninterrupted_one(
        uninterrupted, site, cluster, s3_server):
    """A queue with quota for one run; a low-priority run is training when a high-priority experiment arrives:
    Kueue takes the low run's job back (Preempted, its trainer checkpoints on SIGTERM), runs the high one, then
    admits the low one again, whose same job resumes from its checkpoint and ends bit for bit as if never stopped."""
    if not cluster.kueue_served():
        pytest.skip("the cluster runs no Kueue")
    namespace, check = site["namespace"], site["operator"].check_alive
    cluster.create_cluster_queue(namespace, gpus=0, cpu="2", memory="4Gi")  # one run: 2 pods of 1 CPU and 2Gi
    cluster.create_local_queue(namespace, "team", namespace)
    with cluster.api_client() as api:
        for name, value in ((f"{namespace}-low", 100), (f"{namespace}-high", 1000)):
            client.SchedulingV1Api(api).create_priority_class(
                client.V1PriorityClass(metadata=client.V1ObjectMeta(name=name), value=value))
            cluster.create_workload_priority_class(name, value)
    low_uri = f"s3://{s3_server.bucket}/e2e-kueue-low-{uuid.uuid4().hex[:8]}"
    high_uri = f"s3://{s3_server.bucket}/e2e-kueue-high-{uuid.uuid4().hex[:8]}"
    queued = {"queue": "team", "max_restarts": 2}
    with cluster.api_client() as api:
        experiments = Experiments(api, namespace)
        experiments.create("low", {"arms": ["diffusion"], **cluster_spec(
            low_uri, s3_server.endpoint_url, scheduling={**queued, "priority_class": f"{namespace}-low"})})
        run = wait_until("a verified checkpoint", lambda: (
            r if (r := experiments.runs("low").get("low-dlm")) and r.get("last_checkpoint") else None),
            timeout=TRAINING_TIMEOUT, interval=0.5, check=check)
        assert run["phase"] == "Running" and run["step"] < run["total_steps"], "preempted mid-training"
        (job,) = experiments.jobs("low")
        assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == f"{namespace}-low"
        experiments.create("high", {"arms": ["autoregressive"], **cluster_spec(
            high_uri, s3_server.endpoint_url, data={"epochs": 1},
            scheduling={**queued, "priority_class": f"{namespace}-high"})})
        preempted = experiments.wait_run("low", "low-dlm", "Preempted", timeout=60, check=check)
        assert preempted["restarts"] == 1 and "resumes from its last verified checkpoint" in preempted["message"]
        high = wait_until("high finished", lambda: (
            s if (s := experiments.status("high")).get("phase") in ("Succeeded", "Failed") else None),
            timeout=TRAINING_TIMEOUT, interval=1, check=check)
        assert high["phase"] == "Succeeded", json.dumps(high, indent=1) + _pod_logs(site)
        status = wait_until("low finished", lambda: (
            s if (s := experiments.status("low")).get("phase") in ("Succeeded", "Failed") else None),
            timeout=TRAINING_TIMEOUT, interval=1, check=check)
        (job_after,) = experiments.jobs("low")
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + _pod_logs(site)
    (run,) = status["runs"]
    assert run["restarts"] == 1, "one preemption, one restart"
    assert job_after["metadata"]["uid"] == job["metadata"]["uid"], "Kueue resumed the same job"
    events = metrics_events(s3_server, low_uri, "low-dlm")
    assert sum(e["event"] == "start" for e in events) == 2, "trained, stopped, resumed"
    reference = metrics_events(s3_server, uninterrupted["s3_uri"], "tiny-dlm")
    assert curve(events) == curve(reference), "the resumed run's losses equal the uninterrupted run's, bitwise"


def stdlib_corpus(folder, limit_bytes: int = 1_200_000):
    """A small JSONL corpus (one document per standard-library module, and one naming this test's own run,
    so no cache has it yet) as a local source the pods can read."""
    import sysconfig
    from pathlib import Path

    lines, size = [json.dumps({"text": f"corpus {uuid.uuid4().hex}"})], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="replace")
        lines.append(json.dumps({"text": text}))
        size += len(text)
        if size >= limit_bytes:
            break
    corpus = folder / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    return corpus


def test_a_sweep_over_unique_tokens_prepares_its_source_once_in_an_indexed_job_before_training(
        site, cluster, s3_server, tmp_path, monkeypatch):
    """Two sweep points read one s3:// token cache: one Indexed Job of two pods tokenizes the source's
    shards (a quarter MiB of text each, so both pods have some) before any PyTorchJob exists; the runs then
    train from the cache without tokenizing."""
    s3_uri = f"s3://{s3_server.bucket}/e2e-data-{uuid.uuid4().hex[:8]}"
    spec = cluster_spec(s3_uri, s3_server.endpoint_url, resources={"nodes": 1},
                        data={"train": str(stdlib_corpus(tmp_path)), "cache": f"{s3_uri}/tokens", "epochs": 2,
                              "preparation": {"workers": 2, "cpu": "1", "memory": "2Gi",
                                              "shard_bytes": 256 << 10}},
                        sweep={"data.unique_tokens": [4096, 8192]})
    namespace, executor = site["namespace"], site["executor"]
    with cluster.api_client() as api:
        experiments = Experiments(api, namespace)
        batch = client.BatchV1Api(api)
        experiments.create("prep", {"arms": ["diffusion"], **spec})
        check = site["operator"].check_alive
        job = wait_until("the data-preparation Job", lambda: next(iter(batch.list_namespaced_job(
            namespace, label_selector="dlmctl.io/experiment=prep").items), None), timeout=60, check=check)
        assert experiments.jobs("prep") == [], "no training job before the data is prepared"
        status = wait_until("prep finished", lambda: (
            s if (s := experiments.status("prep")).get("phase") in ("Succeeded", "Failed") else None),
            timeout=TRAINING_TIMEOUT, interval=1, check=check)
        assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + _pod_logs(site)
        pods = experiments.core.list_namespaced_pod(namespace, label_selector=f"job-name={job.metadata.name}").items
    (data,) = status["data"]
    assert (data["phase"], data["completed"], data["workers"]) == ("Succeeded", 2, 2)
    assert sorted(data["runs"]) == sorted(run["name"] for run in status["runs"]) and len(data["runs"]) == 2
    indexes = sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1"] and all(p.status.phase == "Succeeded" for p in pods)
    results = [json.loads(executor.logs(namespace, p.metadata.name).strip().splitlines()[-1]) for p in pods]
    shards = results[0]["shards"]
    assert shards >= 4 and all(r["shards_built"] >= 1 for r in results), results
    assert sum(r["shards_built"] for r in results) == shards, "every shard tokenized once, by the two pods"
    assert sum(r["plan_built"] for r in results) == 1 and any(r["complete"] for r in results), results
    fs = s3_server.filesystem()
    assert any(path.endswith("manifest.json") for path in fs.find(f"{s3_uri}/tokens".removeprefix("s3://"))), \
        "the cache entry is complete: its manifest is written"
    for run in status["runs"]:
        master = f"{run['name']}-master-0"
        assert "data: shard" not in executor.logs(namespace, master), "the runs read the prepared cache"
        events = metrics_events(s3_server, s3_uri, run["name"])
        assert [e for e in events if e["event"] == "done"], run
