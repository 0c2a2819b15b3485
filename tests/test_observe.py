"""The operator's rules for what a job and its pods say about a run, on pod objects shaped as the API
server returns them for cases KWOK nodes cannot produce (image pulls, the OOM killer, lost nodes)."""
from __future__ import annotations

import pytest

from dlmctl.operator.observe import Seen, observe, summarize_job, summarize_pod

JOB_UID = "job-uid-1"


def job(**status) -> dict:
    return summarize_job({
        "metadata": {"name": "r", "uid": JOB_UID},
        "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1}, "Worker": {"replicas": 1}}},
        "status": status,
    })


def pod(name="r-master-0", phase="Running", owner=JOB_UID, conditions=(), container_state=None, reason=None,
        node="kwok-gpu-0", deleting=False) -> dict:
    meta = {"name": name, "uid": f"uid-{name}", "ownerReferences": [{"uid": owner, "controller": True}]}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-29T20:00:00Z"
    status = {"phase": phase, "conditions": list(conditions)}
    if reason:
        status["reason"] = reason
    if container_state:
        status["containerStatuses"] = [{"name": "pytorch", "state": container_state}]
    return summarize_pod({"metadata": meta, "spec": {"nodeName": node}, "status": status})


def running_pair():
    return [pod(), pod("r-worker-0")]


def test_all_replicas_running_is_running_and_fewer_is_pending():
    assert observe(job(), running_pair()).seen is Seen.Running
    assert observe(job(), running_pair()[:1]).seen is Seen.Pending


@pytest.mark.parametrize("waiting", ["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"])
def test_a_container_that_cannot_start_fails_the_run_for_good(waiting):
    stuck = pod("r-worker-0", phase="Pending",
                container_state={"waiting": {"reason": waiting, "message": "pull access denied for x"}})
    seen = observe(job(), [pod(), stuck])
    assert (seen.seen, seen.reason) == (Seen.FailedPermanently, waiting)
    assert "r-worker-0" in seen.message and "pull access denied" in seen.message


def test_the_oom_killer_fails_the_run_for_good():
    killed = pod(phase="Failed", container_state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    seen = observe(job(), [killed, pod("r-worker-0")])
    assert (seen.seen, seen.reason) == (Seen.FailedPermanently, "OOMKilled")
    assert "spec.resources.memory" in seen.message


def test_exit_code_2_is_a_user_error_and_other_codes_are_worth_a_retry():
    user = pod(phase="Failed", container_state={"terminated": {"exitCode": 2, "reason": "Error"}})
    assert observe(job(), [user]).reason == "UserError"
    crash = pod(phase="Failed", container_state={"terminated": {"exitCode": 1, "reason": "Error"}})
    seen = observe(job(), [crash])
    assert seen.seen is Seen.Failed and "code 1" in seen.message


@pytest.mark.parametrize("reason", ["PreemptionByScheduler", "EvictionByEvictionAPI", "DeletionByTaintManager",
                                    "DeletionByPodGC", "TerminationByKubelet"])
def test_a_pod_taken_away_preempts_the_run(reason):
    taken = pod("r-worker-0", conditions=[{"type": "DisruptionTarget", "status": "True", "reason": reason,
                                           "message": "node kwok-gpu-1 is gone"}], deleting=True)
    seen = observe(job(), [pod(), taken])
    assert (seen.seen, seen.reason) == (Seen.Disrupted, reason)
    assert "r-worker-0" in seen.message


def test_a_kubelet_eviction_without_a_condition_preempts_too():
    evicted = pod(phase="Failed", reason="Evicted")
    assert observe(job(), [evicted]).seen is Seen.Disrupted


def test_a_disruption_noted_on_the_job_counts_after_its_pod_is_gone():
    seen = observe(job(), [pod()], disrupted="EvictionByEvictionAPI: pod r-worker-0: Eviction API")
    assert (seen.seen, seen.reason, seen.message) == (Seen.Disrupted, "EvictionByEvictionAPI",
                                                      "pod r-worker-0: Eviction API")


def test_pods_of_an_earlier_job_with_the_same_name_are_not_this_jobs():
    old_failure = pod(phase="Failed", owner="an-earlier-job",
                      container_state={"terminated": {"exitCode": 2, "reason": "Error"}})
    assert observe(job(), [old_failure, *running_pair()]).seen is Seen.Running


def test_unschedulable_pods_carry_the_schedulers_message():
    waiting = pod("r-worker-0", phase="Pending", node=None, conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}])
    seen = observe(job(), [pod(), waiting])
    assert seen.seen is Seen.Unschedulable and "Insufficient nvidia.com/gpu" in seen.message


def test_the_jobs_own_conditions_finish_it():
    assert observe(job(conditions=[{"type": "Succeeded", "status": "True"}]), []).seen is Seen.Succeeded
    failed = job(conditions=[{"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": "x"}])
    assert observe(failed, []).seen is Seen.FailedUnexplained, "waits for the pod to say why"
    assert observe(None, []).seen is Seen.NoJob
