"""The test control plane is a real Kubernetes: real API server and CRD schemas,
real scheduler, real garbage collector, the real Kubeflow training-operator, and
KWOK GPU nodes whose pods finish when the test says so."""

from __future__ import annotations

import time

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from testenv.cluster import GPU_RESOURCE, OUTCOME_KEY

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_LABEL = "training.kubeflow.org/job-name"


# ---------------------------------------------------------------- helpers

def pytorchjob(name: str, *, workers: int = 2, gpus: int = 8, master_gpus: int | None = None) -> dict:
    def replica(n: int, g: int) -> dict:
        return {
            "replicas": n,
            "restartPolicy": "Never",
            "template": {"spec": {"containers": [{
                "name": "pytorch",
                "image": "docker.io/pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime",
                "command": ["python", "-m", "dlmctl.trainer"],
                "resources": {"limits": {GPU_RESOURCE: g}},
            }]}},
        }

    specs = {"Master": replica(1, gpus if master_gpus is None else master_gpus)}
    if workers:
        specs["Worker"] = replica(workers, gpus)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob",
            "metadata": {"name": name}, "spec": {"pytorchReplicaSpecs": specs}}


def wait_until(what: str, fn, timeout: float = 60, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def job_pods(core: client.CoreV1Api, ns: str, job: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(ns, label_selector=f"{JOB_LABEL}={job}").items


def job_conditions(co: client.CustomObjectsApi, ns: str, job: str) -> dict[str, str]:
    obj = co.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    return {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}


def env_of(pod: client.V1Pod) -> dict[str, str]:
    (c,) = [c for c in pod.spec.containers if c.name == "pytorch"]
    return {e.name: e.value for e in c.env or []}


def gpu_nodes(core: client.CoreV1Api, per_node: int) -> list[str]:
    return [n.metadata.name for n in core.list_node().items
            if int((n.status.allocatable or {}).get(GPU_RESOURCE, "0")) >= per_node]


def events_for(core: client.CoreV1Api, ns: str, pod: str) -> list[client.CoreV1Event]:
    return core.list_namespaced_event(
        ns, field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod}").items


@pytest.fixture
def apis(cluster):
    with cluster.api_client() as api:
        yield client.CoreV1Api(api), client.CustomObjectsApi(api)


# ---------------------------------------------------------------- tests

def test_pytorchjob_runs_on_gpu_nodes_succeeds_and_is_garbage_collected(cluster, cluster_namespace, apis):
    core, co = apis
    ns, name = cluster_namespace, "ddp"
    if len(gpu_nodes(core, 8)) < 3:
        pytest.skip("needs 3 nodes with 8 allocatable nvidia.com/gpu")

    co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob(name, workers=2, gpus=8))

    # the training-operator creates one pod per replica; the real scheduler binds them and KWOK runs them
    pods = wait_until("3 Running pods", lambda: (
        p if len(p := job_pods(core, ns, name)) == 3 and all(x.status.phase == "Running" for x in p) else None),
        timeout=90)
    by_role = {(p.metadata.labels["training.kubeflow.org/replica-type"],
                p.metadata.labels["training.kubeflow.org/replica-index"]): p for p in pods}
    assert set(by_role) == {("master", "0"), ("worker", "0"), ("worker", "1")}

    envs = {role: env_of(p) for role, p in by_role.items()}
    for role, env in envs.items():
        assert env["MASTER_ADDR"] == f"{name}-master-0", role
        assert env["WORLD_SIZE"] == "3", role
        assert env["MASTER_PORT"], role
    assert {role: env["RANK"] for role, env in envs.items()} == {
        ("master", "0"): "0", ("worker", "0"): "1", ("worker", "1"): "2"}

    # 8 GPUs each: the scheduler must put them on three different full GPU nodes
    nodes = {p.spec.node_name for p in pods}
    assert len(nodes) == 3 and nodes <= set(gpu_nodes(core, 8))
    for p in pods:
        assert p.spec.containers[0].resources.limits[GPU_RESOURCE] == "8"
        scheduled = [e for e in events_for(core, ns, p.metadata.name) if e.reason == "Scheduled"]
        assert scheduled and "default-scheduler" in (
            scheduled[0].reporting_component or scheduled[0].source.component or ""), scheduled
    # the master's headless service is what MASTER_ADDR resolves to
    assert core.read_namespaced_service(f"{name}-master-0", ns).spec.cluster_ip == "None"

    # the test decides the outcome; KWOK terminates the containers with exit code 0
    for p in pods:
        core.patch_namespaced_pod(p.metadata.name, ns, {"metadata": {"annotations": {OUTCOME_KEY: "Succeeded"}}})
    wait_until("PyTorchJob Succeeded", lambda: job_conditions(co, ns, name).get("Succeeded") == "True", timeout=90)
    assert all(p.status.phase == "Succeeded" for p in job_pods(core, ns, name))

    # deleting the job cascades to its pods and services through ownerReferences (kube-controller-manager GC)
    co.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    wait_until("pods garbage-collected", lambda: not job_pods(core, ns, name), timeout=90)
    wait_until("services garbage-collected",
               lambda: not core.list_namespaced_service(ns, label_selector=f"{JOB_LABEL}={name}").items,
               timeout=60)


def test_job_needing_more_gpus_than_a_node_has_stays_pending_unschedulable(cluster, cluster_namespace, apis):
    core, co = apis
    ns, name = cluster_namespace, "too-big"
    largest = max((int((n.status.allocatable or {}).get(GPU_RESOURCE, "0")) for n in core.list_node().items),
                  default=0)
    co.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, pytorchjob(name, workers=0, master_gpus=largest + 8))

    pod = wait_until("the master pod", lambda: (p[0] if (p := job_pods(core, ns, name)) else None), timeout=60)
    failed = wait_until("a FailedScheduling event", lambda: [
        e for e in events_for(core, ns, pod.metadata.name) if e.reason == "FailedScheduling"], timeout=60)
    assert f"Insufficient {GPU_RESOURCE}" in failed[0].message, failed[0].message

    time.sleep(3)  # stays that way
    pod = core.read_namespaced_pod(pod.metadata.name, ns)
    assert pod.status.phase == "Pending" and not pod.spec.node_name
    (scheduled,) = [c for c in pod.status.conditions if c.type == "PodScheduled"]
    assert (scheduled.status, scheduled.reason) == ("False", "Unschedulable")
    conds = job_conditions(co, ns, name)
    assert conds.get("Running") != "True" and conds.get("Succeeded") != "True", conds


def test_job_whose_gpus_exceed_the_cluster_total_leaves_a_replica_unschedulable(cluster, cluster_namespace, apis):
    core, co = apis
    ns, name = cluster_namespace, "too-many"
    slots = len(gpu_nodes(core, 8))  # one 8-GPU replica fits per node
    co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob(name, workers=slots, gpus=8))

    def settled():
        pods = job_pods(core, ns, name)
        bound = [p for p in pods if p.spec.node_name]
        pending = [p for p in pods if not p.spec.node_name and any(
            e.reason == "FailedScheduling" for e in events_for(core, ns, p.metadata.name))]
        return (bound, pending) if len(pods) == slots + 1 and len(bound) == slots and pending else None

    bound, pending = wait_until(f"{slots} bound replicas and 1 unschedulable", settled, timeout=90)
    assert len({p.spec.node_name for p in bound}) == slots
    (event, *_) = [e for e in events_for(core, ns, pending[0].metadata.name) if e.reason == "FailedScheduling"]
    assert f"Insufficient {GPU_RESOURCE}" in event.message, event.message


# Kueue's mutating webhook decodes every PyTorchJob before the schema is checked: a value of the wrong type is
# refused there (400, naming the Go field), as on a real cluster running Kueue.
@pytest.mark.parametrize("mutate, status, words", [
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas="three"),
     400, ("pytorchReplicaSpecs.replicas", "cannot unmarshal string")),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].pop("name"),
     422, ("spec.pytorchReplicaSpecs.Master.template.spec.containers[0].name", "Required value")),
], ids=["replicas-not-an-integer", "container-without-name"])
def test_api_server_rejects_pytorchjob_that_violates_the_crd_schema(cluster, cluster_namespace, apis,
                                                                    mutate, status, words):
    core, co = apis
    job = pytorchjob("invalid", workers=1)
    mutate(job)
    with pytest.raises(ApiException) as err:
        co.create_namespaced_custom_object(GROUP, VERSION, cluster_namespace, PLURAL, job)
    assert err.value.status == status, err.value.body
    assert all(w in err.value.body for w in words), err.value.body
    assert not co.list_namespaced_custom_object(GROUP, VERSION, cluster_namespace, PLURAL)["items"]


def test_training_operator_webhook_rejects_job_without_pytorch_container(cluster, cluster_namespace, apis):
    core, co = apis
    job = pytorchjob("no-pytorch-container", workers=1)
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(ApiException) as err:
        co.create_namespaced_custom_object(GROUP, VERSION, cluster_namespace, PLURAL, job)
    assert "validator.pytorchjob.training-operator.kubeflow.org" in err.value.body, err.value.body
    assert "must have at least one container with name pytorch" in err.value.body, err.value.body


def test_service_account_token_is_least_privilege(cluster, cluster_namespace):
    kubeconfig = cluster.kubeconfig_for("reader", cluster_namespace)
    with cluster.api_client(kubeconfig) as api:
        core = client.CoreV1Api(api)
        with pytest.raises(ApiException) as err:
            core.list_namespaced_pod(cluster_namespace)
        assert err.value.status == 403
        assert f"system:serviceaccount:{cluster_namespace}:reader" in err.value.body
