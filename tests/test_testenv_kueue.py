"""Kueue in the test control plane queues PyTorchJobs: a job labelled with a LocalQueue waits, suspended, until
its Workload gets quota in the ClusterQueue; then Kueue unsuspends it and the training-operator's pods run on the
KWOK GPU nodes. A job that names no queue is not Kueue's. A higher-priority job evicts a lower one from a full
queue. Kueue's visibility API, aggregated into the API server, tells the waiting jobs' places in line."""

from __future__ import annotations

import pytest
from kubernetes import client

from operator_harness import wait_until as wait_for
from testenv.cluster import (GPU_FLAVOR, GPU_RESOURCE, KUEUE_GROUP, KUEUE_VERSION, KUEUE_VISIBILITY_DIR,
                             KUEUE_VISIBILITY_GROUP, KUEUE_VISIBILITY_VERSION, OUTCOME_KEY, PRIORITY_CLASS_LABEL,
                             QUEUE_NAME_LABEL)

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_LABEL = "training.kubeflow.org/job-name"


# ---------------------------------------------------------------- helpers

def pytorchjob(name: str, *, queue: str | None = None, priority_class: str | None = None,
               suspend: bool = True) -> dict:
    """One Master with 8 GPUs, 1 CPU and 1Gi."""
    labels = {QUEUE_NAME_LABEL: queue} if queue else {}
    if priority_class:
        labels[PRIORITY_CLASS_LABEL] = priority_class
    resources = {GPU_RESOURCE: 8, "cpu": 1, "memory": "1Gi"}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob",
            "metadata": {"name": name, "labels": labels},
            "spec": {"runPolicy": {"suspend": suspend}, "pytorchReplicaSpecs": {"Master": {
                "replicas": 1, "restartPolicy": "Never",
                "template": {"spec": {"containers": [{
                    "name": "pytorch", "image": "docker.io/library/busybox:1.36", "command": ["true"],
                    "resources": {"requests": resources, "limits": resources}}]}}}}}}


def wait_until(what: str, fn):
    return wait_for(what, fn, timeout=90, interval=0.5)


def conditions(obj: dict | None) -> dict[str, dict]:
    return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def condition(obj: dict | None, kind: str) -> str | None:
    return conditions(obj).get(kind, {}).get("status")


def workloads(co: client.CustomObjectsApi, ns: str) -> list[dict]:
    return co.list_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, ns, "workloads")["items"]


def workload_of(co: client.CustomObjectsApi, ns: str, job: str) -> dict | None:
    """The Workload Kueue made for the PyTorchJob (it owns it)."""
    owned = [w for w in workloads(co, ns) if any(
        (o["kind"], o["name"]) == ("PyTorchJob", job) for o in w["metadata"].get("ownerReferences", []))]
    assert len(owned) <= 1, owned
    return owned[0] if owned else None


def suspended(co: client.CustomObjectsApi, ns: str, job: str) -> bool:
    obj = co.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    return bool(obj["spec"].get("runPolicy", {}).get("suspend"))


def running_pod(core: client.CoreV1Api, ns: str, job: str) -> client.V1Pod | None:
    pods = core.list_namespaced_pod(ns, label_selector=f"{JOB_LABEL}={job}").items
    return pods[0] if len(pods) == 1 and pods[0].status.phase == "Running" else None


def admitted(co: client.CustomObjectsApi, ns: str, job: str) -> dict | None:
    wl = workload_of(co, ns, job)
    return wl if condition(wl, "QuotaReserved") == "True" and condition(wl, "Admitted") == "True" else None


def runs(core, co, ns: str, job: str) -> client.V1Pod:
    """Waits until the job's Workload is admitted, the job unsuspended and its pod Running."""
    wait_until(f"{job}'s Workload admitted", lambda: admitted(co, ns, job))
    wait_until(f"{job} unsuspended", lambda: not suspended(co, ns, job))
    return wait_until(f"{job}'s pod Running", lambda: running_pod(core, ns, job))


@pytest.fixture
def apis(cluster):
    with cluster.api_client() as api:
        yield client.CoreV1Api(api), client.CustomObjectsApi(api)


@pytest.fixture
def priority_classes(cluster, cluster_namespace, apis):
    """WorkloadPriorityClasses "<namespace>-<name>" (cluster-scoped), deleted afterwards."""
    _, co = apis
    made = []

    def make(name: str, value: int) -> str:
        full = f"{cluster_namespace}-{name}"
        cluster.create_workload_priority_class(full, value)
        made.append(full)
        return full

    yield make
    for name in made:
        co.delete_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "workloadpriorityclasses", name)


# ---------------------------------------------------------------- tests

def test_queued_job_is_admitted_and_its_pod_runs_on_a_gpu_node(cluster, cluster_namespace, kueue_queue, apis):
    core, co = apis
    ns, queue = cluster_namespace, kueue_queue(gpus=16)
    co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob("train", queue=queue))

    pod = runs(core, co, ns, "train")
    wl = workload_of(co, ns, "train")
    admission = wl["status"]["admission"]
    assert admission["clusterQueue"] == ns  # kueue_queue's ClusterQueue is named after the namespace
    (assignment,) = admission["podSetAssignments"]
    assert assignment["flavors"] == {"cpu": GPU_FLAVOR, "memory": GPU_FLAVOR, GPU_RESOURCE: GPU_FLAVOR}
    # the flavor's node labels reach the pod, which the scheduler put on a GPU node
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    node = core.read_node(pod.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.present"] == "true"

    # the Workload belongs to the job: kube-controller-manager's garbage collector removes it with the job
    co.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "train")
    wait_until("the Workload garbage-collected", lambda: not workloads(co, ns))


def test_kueue_webhook_suspends_a_queued_job_at_creation(cluster, cluster_namespace, kueue_queue, apis):
    _, co = apis
    queue = kueue_queue()
    created = co.create_namespaced_custom_object(
        GROUP, VERSION, cluster_namespace, PLURAL, pytorchjob("eager", queue=queue, suspend=False))
    assert created["spec"]["runPolicy"]["suspend"] is True


def test_job_waits_for_quota_until_the_running_one_finishes(cluster, cluster_namespace, kueue_queue, apis):
    core, co = apis
    ns, queue = cluster_namespace, kueue_queue(gpus=8)
    co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob("first", queue=queue))
    first_pod = runs(core, co, ns, "first")

    co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob("second", queue=queue))
    waiting = wait_until("second's Workload without quota", lambda: (
        w if condition(w := workload_of(co, ns, "second"), "QuotaReserved") == "False" else None))
    message = conditions(waiting)["QuotaReserved"]["message"]
    assert "insufficient" in message and GPU_RESOURCE in message, message
    assert condition(waiting, "Admitted") != "True"
    assert suspended(co, ns, "second")
    assert not core.list_namespaced_pod(ns, label_selector=f"{JOB_LABEL}=second").items

    core.patch_namespaced_pod(first_pod.metadata.name, ns, {"metadata": {"annotations": {OUTCOME_KEY: "Succeeded"}}})
    wait_until("first Succeeded", lambda: condition(
        co.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "first"), "Succeeded") == "True")
    wait_until("first's Workload Finished", lambda: condition(workload_of(co, ns, "first"), "Finished") == "True")
    runs(core, co, ns, "second")


def test_job_without_a_queue_label_is_not_kueues(cluster, cluster_namespace, kueue_queue, apis):
    core, co = apis
    ns = cluster_namespace
    kueue_queue()  # a LocalQueue exists in the namespace; the job names none
    created = co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob("free", suspend=False))
    assert created["spec"]["runPolicy"]["suspend"] is False

    wait_until("free's pod Running", lambda: running_pod(core, ns, "free"))
    assert not suspended(co, ns, "free")
    assert workloads(co, ns) == []


def test_higher_priority_job_preempts_a_lower_one_in_a_full_queue(cluster, cluster_namespace, kueue_queue, apis,
                                                                  priority_classes):
    core, co = apis
    ns, queue = cluster_namespace, kueue_queue(gpus=8)
    low, high = priority_classes("low", 100), priority_classes("high", 1000)
    co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob("low", queue=queue, priority_class=low))
    runs(core, co, ns, "low")
    assert workload_of(co, ns, "low")["spec"]["priority"] == 100

    co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                       pytorchjob("high", queue=queue, priority_class=high))
    evicted = wait_until("low's Workload evicted", lambda: (
        w if condition(w := workload_of(co, ns, "low"), "Evicted") == "True" else None))
    assert conditions(evicted)["Evicted"]["reason"] == "Preempted", conditions(evicted)
    wait_until("low suspended", lambda: suspended(co, ns, "low"))
    runs(core, co, ns, "high")
    assert condition(workload_of(co, ns, "low"), "QuotaReserved") == "False"


def test_the_visibility_api_lists_the_waiting_jobs_in_the_order_kueue_admits_them(
        cluster, cluster_namespace, kueue_queue, apis, priority_classes):
    """Waiting jobs are in line by priority, not by when they came: created low, high, mid, they wait high, mid,
    low; and the first in line is the one admitted when quota frees."""
    if not cluster.kueue_visibility_served():
        pytest.skip(f"Kueue's visibility server needs to write {KUEUE_VISIBILITY_DIR}")
    core, co = apis
    ns, queue = cluster_namespace, kueue_queue(gpus=8)
    top = priority_classes("top", 10_000)  # the running job: nothing waiting may preempt it
    co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob("running", queue=queue,
                                                                              priority_class=top))
    pod = runs(core, co, ns, "running")
    for name, value in (("low", 10), ("high", 1000), ("mid", 100)):
        co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pytorchjob(
            name, queue=queue, priority_class=priority_classes(name, value)))
    workload_job = lambda: {w["metadata"]["name"]: w["metadata"]["ownerReferences"][0]["name"]
                            for w in workloads(co, ns)}

    def in_line(path: str) -> list[tuple[str, int, int]] | None:
        summary = co.api_client.call_api(
            f"/apis/{KUEUE_VISIBILITY_GROUP}/{KUEUE_VISIBILITY_VERSION}/{path}/pendingworkloads", "GET",
            response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True)
        jobs = workload_job()
        places = sorted((w["positionInClusterQueue"], jobs.get(w["metadata"]["name"]), w["positionInLocalQueue"])
                        for w in summary["items"])
        return places if len(places) == 3 else None

    expected = [(0, "high", 0), (1, "mid", 1), (2, "low", 2)]
    assert wait_until("three jobs in line", lambda: in_line(f"namespaces/{ns}/localqueues/{queue}")) \
        == expected
    assert in_line(f"clusterqueues/{ns}") == expected  # kueue_queue names the ClusterQueue after ns
    core.patch_namespaced_pod(pod.metadata.name, ns, {"metadata": {"annotations": {OUTCOME_KEY: "Succeeded"}}})
    runs(core, co, ns, "high")
    assert not admitted(co, ns, "mid") and not admitted(co, ns, "low")


def test_kueue_objects_convert_between_api_versions(cluster, cluster_namespace, kueue_queue, apis):
    """ClusterQueues (like LocalQueues, Workloads, Cohorts, MultiKueueClusters) are stored as v1beta2 and
    converted by Kueue's conversion webhook: v1beta2's spec.cohortName is v1beta1's spec.cohort."""
    _, co = apis
    kueue_queue(gpus=24)
    co.patch_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "clusterqueues", cluster_namespace,
                                   {"spec": {"cohortName": "research"}})
    old = co.get_cluster_custom_object(KUEUE_GROUP, "v1beta1", "clusterqueues", cluster_namespace)
    assert old["apiVersion"] == f"{KUEUE_GROUP}/v1beta1"
    assert old["spec"]["cohort"] == "research" and "cohortName" not in old["spec"], old["spec"]
    (group,) = old["spec"]["resourceGroups"]
    (flavor,) = group["flavors"]
    quota = {r["name"]: str(r["nominalQuota"]) for r in flavor["resources"]}
    assert (flavor["name"], quota[GPU_RESOURCE]) == (GPU_FLAVOR, "24")
