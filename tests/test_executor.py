"""The test pod executor: on the test control plane, pods bound to KWOK nodes in an opted-in
namespace really run -- as local processes started the way a kubelet starts a container -- and
end with their process's exit code; deleting or evicting a pod stops its process like a kubelet."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from test_cluster import GROUP, PLURAL, VERSION, job_conditions, job_pods, wait_until
from testenv.executor import PodExecutor, expand, map_paths


# ---------------------------------------------------------------- helpers

@pytest.fixture
def apis(cluster):
    with cluster.api_client() as api:
        yield client.CoreV1Api(api), client.CustomObjectsApi(api)


def bare_pod(name: str, command: list[str], *, mounts: dict[str, str] | None = None, grace: int | None = None,
             env: list[dict] | None = None) -> dict:
    """A pod (restartPolicy Never) whose one container runs ``command``; ``mounts``: volume -> mountPath."""
    mounts = mounts or {}
    spec = {
        "restartPolicy": "Never",
        "containers": [{
            "name": "main", "image": "busybox", "command": command, "env": env or [],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
            "volumeMounts": [{"name": v, "mountPath": p} for v, p in mounts.items()],
        }],
        "volumes": [{"name": v, "emptyDir": {}} for v in mounts],
    }
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def create_pod(core: client.CoreV1Api, ns: str, pod: dict) -> None:
    # ServiceAccount admission rejects pods until the namespace's "default" account exists
    wait_until("the default ServiceAccount", lambda: any(
        sa.metadata.name == "default" for sa in core.list_namespaced_service_account(ns).items),
        timeout=30, interval=0.1)
    core.create_namespaced_pod(ns, pod)


def pod_phase(core: client.CoreV1Api, ns: str, name: str) -> str | None:
    pods = core.list_namespaced_pod(ns, field_selector=f"metadata.name={name}").items
    return pods[0].status.phase if pods else None


def wait_phase(core, ns: str, name: str, phase: str, timeout: float = 60) -> client.V1Pod:
    wait_until(f"pod {name} {phase}", lambda: pod_phase(core, ns, name) == phase, timeout=timeout, interval=0.1)
    return core.read_namespaced_pod(name, ns)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def terminated(pod: client.V1Pod) -> client.V1ContainerStateTerminated:
    (status,) = pod.status.container_statuses
    return status.state.terminated


# The container of the PyTorchJob below: records what it was given, then proves MASTER_ADDR/MASTER_PORT work
# by joining a real two-process gloo group and all-reducing its rank + 1.
RECORDER = """
import datetime, json, os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
total = torch.tensor([dist.get_rank() + 1])
dist.all_reduce(total)
dist.destroy_process_group()
keys = ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "AWS_ACCESS_KEY_ID", "CFG_MODE", "FROM_CM",
        "FROM_SECRET", "POD_NAME", "POD_NAMESPACE", "GREETING", "CKPT_DIR", "KUBECONFIG"]
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "all_reduce": int(total), "python": sys.executable,
          **{k: os.environ.get(k) for k in keys}}
with open(sys.argv[1], "w") as f:
    json.dump(record, f)
"""


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("text, expected", [
    ("$(NAME)", "value"),
    ("pre-$(NAME)-post", "pre-value-post"),
    ("$$(NAME)", "$(NAME)"),          # $$ escapes
    ("$$$(NAME)", "$value"),
    ("$(UNKNOWN)", "$(UNKNOWN)"),     # unknown references stay as written
    ("$(NAME", "$(NAME"),             # an unclosed reference is literal
    ("$NAME and 5$", "$NAME and 5$"),  # only $( starts a reference
])
def test_expansion_follows_the_kubelet(text, expected):
    assert expand(text, {"NAME": "value"}.get) == expected


def test_mount_paths_are_replaced_where_they_start_a_path(tmp_path):
    mounts = {"/workspace/output": tmp_path / "out", "/workspace": tmp_path / "ws", "/dev/shm": tmp_path / "shm"}
    assert map_paths("--output=/workspace/output/ckpt", mounts) == f"--output={tmp_path}/out/ckpt"
    assert map_paths("/workspace/outputs", mounts) == f"{tmp_path}/ws/outputs"  # the longest mount that fits
    assert map_paths("/dev/shm:/dev/shmem:/opt/workspace", mounts) == f"{tmp_path}/shm:/dev/shmem:/opt/workspace"


# ---------------------------------------------------------------- on the control plane

@pytest.mark.cluster
def test_pytorchjob_pods_run_locally_with_the_env_a_kubelet_gives_and_the_job_succeeds(
        cluster, cluster_namespace, pod_executor, apis):
    core, co = apis
    ns, name = cluster_namespace, "envjob"
    core.create_namespaced_secret(ns, client.V1Secret(metadata=client.V1ObjectMeta(name="creds"),
                                                      string_data={"AWS_ACCESS_KEY_ID": "AKIA-from-secret",
                                                                   "token": "s3cr3t"}))
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings"),
                                                             data={"MODE": "fast", "level": "7"}))
    container = {
        "name": "pytorch",
        "image": "docker.io/pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
        "command": ["python", "-c", RECORDER],
        "args": ["/workspace/output/rank-$(RANK).json", "--greeting=$(GREETING)", "--escaped=$$(RANK)",
                 "--unknown=$(NOT_DEFINED)"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "GREETING", "value": "hello-$(POD_NAME)"},
            {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
            {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "CKPT_DIR", "value": "/workspace/output/ckpt"},
        ],
        "envFrom": [{"secretRef": {"name": "creds"}}, {"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "volumeMounts": [{"name": "output", "mountPath": "/workspace/output"}],
    }
    replica = {"replicas": 1, "restartPolicy": "Never",
               "template": {"spec": {"containers": [container], "volumes": [{"name": "output", "emptyDir": {}}]}}}
    co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob", "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {"Master": replica, "Worker": replica}}})

    pods = wait_until("both pods Succeeded", lambda: (
        p if len(p := job_pods(core, ns, name)) == 2 and all(x.status.phase == "Succeeded" for x in p) else None),
        timeout=180)
    wait_until("PyTorchJob Succeeded", lambda: job_conditions(co, ns, name).get("Succeeded") == "True", timeout=60)
    pods = {p.metadata.name: p for p in pods}
    assert set(pods) == {f"{name}-master-0", f"{name}-worker-0"}
    for pod in pods.values():
        assert terminated(pod).exit_code == 0
        # what the training-operator asked for: the master's headless Service
        spec_env = {e.name: e.value for e in pod.spec.containers[0].env}
        assert spec_env["MASTER_ADDR"] == f"{name}-master-0"

    records = {}
    for rank, pod in ((0, f"{name}-master-0"), (1, f"{name}-worker-0")):
        run = pod_executor.run(ns, pod)
        assert run.exit_code == 0, pod_executor.logs(ns, pod)
        output_dir = run.mounts["/workspace/output"]  # the emptyDir, a local directory per pod
        assert output_dir.is_relative_to(pod_executor.workdir)
        records[rank] = json.loads((output_dir / f"rank-{rank}.json").read_text())
        assert records[rank]["cwd"] == str(run.cwd)
        assert records[rank]["argv"] == [str(output_dir / f"rank-{rank}.json"), f"--greeting=hello-{pod}",
                                         "--escaped=$(RANK)", "--unknown=$(NOT_DEFINED)"]
        assert records[rank]["POD_NAME"] == pod and records[rank]["GREETING"] == f"hello-{pod}"
        assert records[rank]["CKPT_DIR"] == str(output_dir / "ckpt")
    master, worker = records[0], records[1]
    assert (master["RANK"], worker["RANK"]) == ("0", "1")
    assert master["WORLD_SIZE"] == worker["WORLD_SIZE"] == "2"
    assert master["MASTER_ADDR"] == worker["MASTER_ADDR"] == "127.0.0.1"
    assert master["MASTER_PORT"] == worker["MASTER_PORT"] and int(master["MASTER_PORT"]) > 0
    assert master["all_reduce"] == worker["all_reduce"] == 1 + 2  # they really met on that port
    for r in (master, worker):
        assert (r["AWS_ACCESS_KEY_ID"], r["FROM_SECRET"], r["CFG_MODE"], r["FROM_CM"]) == (
            "AKIA-from-secret", "s3cr3t", "fast", "7")
        assert r["POD_NAMESPACE"] == ns
        assert r["KUBECONFIG"] is None
        assert Path(r["python"]).parent == Path(pod_executor.base_env["PATH"].split(":")[0])


@pytest.mark.cluster
@pytest.mark.parametrize("command, exit_code", [
    (["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"], 3),
    # a signal death, reported as a kubelet does; "$$$$" is the shell's "$$" after the kubelet's $(VAR) expansion
    (["sh", "-c", "echo to-stdout; echo to-stderr >&2; kill -KILL $$$$"], 128 + 9),
], ids=["exit-3", "killed-by-signal"])
def test_a_failing_process_fails_its_pod_with_its_exit_code(cluster, cluster_namespace, pod_executor, apis,
                                                           command, exit_code):
    core, _ = apis
    ns = cluster_namespace
    create_pod(core, ns, bare_pod("fails", command))

    pod = wait_phase(core, ns, "fails", "Failed")
    assert terminated(pod).exit_code == exit_code
    assert terminated(pod).reason == "Error"
    assert pod_executor.run(ns, "fails").exit_code == exit_code
    output = pod_executor.logs(ns, "fails")
    assert "to-stdout" in output and "to-stderr" in output
    assert pod_executor.log_path(ns, "fails").read_text() == output
    # `kubectl logs` goes through the API server to KWOK, which serves the same file
    assert core.read_namespaced_pod_log("fails", ns) == output


# On SIGTERM: write a marker into the pod's volume, then exit 0.
TRAP_TERM = "trap 'echo got-SIGTERM > /data/marker; exit 0' TERM; echo started; while true; do sleep 0.1; done"


@pytest.mark.cluster
def test_an_evicted_pods_process_gets_sigterm_and_exits(cluster, cluster_namespace, pod_executor, apis):
    core, _ = apis
    ns = cluster_namespace
    create_pod(core, ns, bare_pod("evictee", ["sh", "-c", TRAP_TERM], mounts={"data": "/data"}, grace=20))
    wait_until("the process's first output", lambda: "started" in pod_executor.logs(ns, "evictee"), timeout=60)
    run = pod_executor.run(ns, "evictee")
    assert not run.exited.is_set()

    evicted_at = time.time()
    core.create_namespaced_pod_eviction("evictee", ns, client.V1Eviction(
        metadata=client.V1ObjectMeta(name="evictee", namespace=ns)))

    assert run.exited.wait(15), "the process survived its eviction"
    assert (run.mounts["/data"] / "marker").read_text() == "got-SIGTERM\n"
    assert run.signals == ["SIGTERM"] and run.exit_code == 0
    assert run.exited_at - evicted_at < 10  # it reacted to SIGTERM, not to the SIGKILL at the end of the grace
    wait_until("the evicted pod removed", lambda: pod_phase(core, ns, "evictee") is None, timeout=30)


@pytest.mark.cluster
def test_a_deleted_pod_that_ignores_sigterm_is_killed_after_its_grace_period(cluster, cluster_namespace,
                                                                            pod_executor, apis):
    core, _ = apis
    ns = cluster_namespace
    ignores_term = "trap '' TERM; echo started; while true; do sleep 0.1; done"
    create_pod(core, ns, bare_pod("stubborn", ["sh", "-c", ignores_term], grace=3))
    wait_until("the process's first output", lambda: "started" in pod_executor.logs(ns, "stubborn"), timeout=60)
    run = pod_executor.run(ns, "stubborn")

    deleted_at = time.time()
    core.delete_namespaced_pod("stubborn", ns)  # the pod's terminationGracePeriodSeconds: 3

    assert run.exited.wait(20)
    assert run.signals == ["SIGTERM", "SIGKILL"]
    assert run.exit_code == 128 + 9
    assert 3 <= run.exited_at - deleted_at < 8


@pytest.mark.cluster
def test_a_recreated_pod_waits_for_the_previous_process_of_its_name(cluster, cluster_namespace, pod_executor, apis):
    core, _ = apis
    ns = cluster_namespace
    # the first process keeps running after SIGTERM until the test drops a "release" file into its volume
    lingering = "trap 'while [ ! -e /data/release ]; do sleep 0.1; done; exit 0' TERM; echo first; " \
                "while true; do sleep 0.1; done"
    create_pod(core, ns, bare_pod("same", ["sh", "-c", lingering], mounts={"data": "/data"}))
    wait_until("the first process's output", lambda: "first" in pod_executor.logs(ns, "same"), timeout=60)
    first = pod_executor.run(ns, "same")

    core.delete_namespaced_pod("same", ns)
    wait_until("the first pod removed", lambda: pod_phase(core, ns, "same") is None, timeout=30)
    create_pod(core, ns, bare_pod("same", ["sh", "-c", "echo second"]))
    wait_phase(core, ns, "same", "Running")  # KWOK says Running, but a kubelet would not start it yet

    time.sleep(1.5)
    assert first.signals == ["SIGTERM"] and not first.exited.is_set()
    assert len(pod_executor.runs(ns, "same")) == 1, "the new pod started while the old process still ran"

    (first.mounts["/data"] / "release").touch()
    assert first.exited.wait(15)
    second = pod_executor.wait_started(ns, "same", timeout=30, after=1)
    assert second.started_at >= first.exited_at
    assert second.uid != first.uid
    pod = wait_phase(core, ns, "same", "Succeeded")
    assert pod.metadata.uid == second.uid
    assert pod_executor.logs(ns, "same") == "second\n"


@pytest.mark.cluster
def test_pods_in_namespaces_the_executor_was_not_given_keep_waiting_for_the_test(cluster, pod_executor, apis):
    core, _ = apis
    other = f"not-executed-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        create_pod(core, other, bare_pod("idle", ["sh", "-c", "exit 0"]))
        wait_phase(core, other, "idle", "Running")
        time.sleep(2)
        assert pod_phase(core, other, "idle") == "Running"
        assert pod_executor.runs(other, "idle") == []
    finally:
        core.delete_namespace(other)
        core.delete_collection_namespaced_pod(other, grace_period_seconds=0)


@pytest.mark.cluster
def test_stopping_the_executor_kills_every_process_group_it_started(cluster, cluster_namespace, apis, tmp_path):
    core, _ = apis
    ns = cluster_namespace
    # the shell and its background child both ignore SIGTERM: only a SIGKILL to the whole group ends them
    tree = "trap '' TERM; sleep 300 & echo child $!; while true; do sleep 0.1; done"
    with PodExecutor(cluster, namespaces={ns}, workdir=tmp_path) as executor:
        create_pod(core, ns, bare_pod("tree", ["sh", "-c", tree]))
        wait_until("the child's pid", lambda: re.search(r"child (\d+)", executor.logs(ns, "tree")), timeout=60)
        run = executor.run(ns, "tree")
        child = int(re.search(r"child (\d+)", executor.logs(ns, "tree")).group(1))
        assert alive(run.pid) and alive(child)

    assert run.exited.is_set() and run.exit_code == 128 + 9
    wait_until("the background child gone", lambda: not alive(child), timeout=10, interval=0.1)
    assert pod_phase(core, ns, "tree") == "Running"  # nothing reports an exit after stop()
