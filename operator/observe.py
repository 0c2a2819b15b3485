"""What a run's PyTorchJob and pods say about it: the rules, as pure functions over API objects.

Pods are summarised once (when the operator's index sees them) into small dicts; `observe` turns a
job summary and its pods' summaries into one `Observation`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

# A container that cannot start for these reasons will not start on a retry either.
PERMANENT_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                     "CreateContainerError"}
USER_ERROR_EXIT = 2  # the trainer's exit code for a mistake in the spec (see dlmctl.trainer.__main__)
# Pod conditions and reasons a kubelet, the scheduler, the taint manager or the eviction API leave on a
# pod they take away: the run did nothing wrong and resumes from its checkpoint.
GPU_RESOURCE = "nvidia.com/gpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DISRUPTION_REASONS = {"Evicted", "Preempting", "Terminated", "NodeLost", "Shutdown", "NodeShutdown"}


class Seen(str, Enum):
    NoJob = "NoJob"
    Deleting = "Deleting"
    Pending = "Pending"
    Unschedulable = "Unschedulable"
    Running = "Running"
    Succeeded = "Succeeded"
    Suspended = "Suspended"
    Disrupted = "Disrupted"  # evicted, preempted, lost with its node
    FailedPermanently = "FailedPermanently"  # a retry would fail the same way
    Failed = "Failed"  # anything else; worth a retry
    FailedUnexplained = "FailedUnexplained"  # the job says Failed, no pod says why (yet: events race)


@dataclass(frozen=True)
class Observation:
    seen: Seen
    reason: Optional[str] = None
    message: Optional[str] = None


def summarize_pod(body: dict) -> dict:
    """The few fields of a pod the rules need (kept in the operator's in-memory index)."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {}) or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    containers = []
    for c in status.get("containerStatuses") or []:
        state = c.get("state") or {}
        terminated = state.get("terminated") or (c.get("lastState") or {}).get("terminated")
        containers.append({
            "waiting": (state.get("waiting") or {}).get("reason"),
            "waiting_message": (state.get("waiting") or {}).get("message"),
            "exit_code": terminated.get("exitCode") if terminated else None,
            "terminated_reason": terminated.get("reason") if terminated else None,
        })
    owner = next((o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    scheduled = conditions.get("PodScheduled") or {}
    disruption = conditions.get("DisruptionTarget") or {}
    return {
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "job_uid": owner,
        "phase": status.get("phase"),
        "reason": status.get("reason"),
        "message": status.get("message"),
        "node": spec.get("nodeName"),
        "deleting": bool(meta.get("deletionTimestamp")),
        "unschedulable": scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable",
        "scheduler_message": scheduled.get("message"),
        "disruption": (disruption.get("reason") or "Disrupted", disruption.get("message"))
        if disruption.get("status") == "True" else None,
        "containers": containers,
        "gpus": sum(_quantity(((c.get("resources") or {}).get("requests") or {}).get(GPU_RESOURCE))
                    for c in spec.get("containers") or []),
    }


def _quantity(value) -> int:
    """A whole-unit resource quantity as the API writes it (extended resources such as GPUs are integers)."""
    return int(value) if value is not None else 0


def pod_disruption(pod: dict) -> Optional[tuple[str, str]]:
    """(reason, message) when the pod was taken away rather than failing on its own."""
    if pod["disruption"]:
        return pod["disruption"]
    if pod["reason"] in DISRUPTION_REASONS:
        return pod["reason"], pod["message"] or pod["reason"]
    return None


def job_conditions(status: dict) -> dict[str, tuple]:
    """A job's conditions (PyTorchJob or batch Job) by type: (status, reason, message)."""
    return {c.get("type"): (c.get("status"), c.get("reason"), c.get("message")) for c in status.get("conditions") or []}


def summarize_job(body: dict) -> dict:
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {}) or {}
    conditions = job_conditions(status)
    return {
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "annotations": dict(meta.get("annotations") or {}),
        "queue": (meta.get("labels") or {}).get(QUEUE_LABEL),  # Kueue's: ours, or its default LocalQueue's
        "deleting": bool(meta.get("deletionTimestamp")),
        "suspended": bool((spec.get("runPolicy") or {}).get("suspend")),
        "conditions": conditions,
        "replicas": sum(int(r.get("replicas") or 1) for r in (spec.get("pytorchReplicaSpecs") or {}).values()),
    }


def observe(job: Optional[dict], pods: list[dict], disrupted: Optional[str] = None) -> Observation:
    """The state of one run's current job. `disrupted` is what the operator noted when one of the job's
    pods was taken away (the pod itself may be gone by now)."""
    if job is None:
        return Observation(Seen.NoJob)
    if job["deleting"]:
        return Observation(Seen.Deleting)
    pods = [p for p in pods if p["job_uid"] == job["uid"]]  # not the pods of an earlier job of the same name
    if disrupted:
        reason, _, message = disrupted.partition(": ")
        return Observation(Seen.Disrupted, reason, message or reason)
    for pod in pods:
        if found := pod_disruption(pod):
            return Observation(Seen.Disrupted, found[0], f"pod {pod['name']}: {found[1]}")
    conditions = job["conditions"]
    if conditions.get("Succeeded", (None,))[0] == "True":
        return Observation(Seen.Succeeded, "Succeeded", "training finished")
    if job["suspended"]:
        return Observation(Seen.Suspended, "Suspended", "the job is suspended")
    for pod in pods:
        for c in pod["containers"]:
            if c["waiting"] in PERMANENT_WAITING:
                return Observation(Seen.FailedPermanently, c["waiting"],
                                   f"pod {pod['name']}: {c['waiting_message'] or c['waiting']}")
    failed = [p for p in pods if p["phase"] == "Failed"]
    for pod in failed:
        for c in pod["containers"]:
            if c["terminated_reason"] == "OOMKilled":
                return Observation(Seen.FailedPermanently, "OOMKilled",
                                   f"pod {pod['name']} ran out of memory (raise spec.resources.memory)")
            if c["exit_code"] == USER_ERROR_EXIT:
                return Observation(Seen.FailedPermanently, "UserError",
                                   f"pod {pod['name']} exited with code 2: a mistake in the spec (see its logs)")
    if failed:
        pod = failed[0]
        codes = [c["exit_code"] for c in pod["containers"] if c["exit_code"] is not None]
        code = f" with code {codes[0]}" if codes else ""
        return Observation(Seen.Failed, pod["reason"] or "Error", f"pod {pod['name']} failed{code}")
    if conditions.get("Failed", (None,))[0] == "True":
        return Observation(Seen.FailedUnexplained, conditions["Failed"][1] or "JobFailed", conditions["Failed"][2])
    unschedulable = [p for p in pods if p["unschedulable"] and not p["node"]]
    if unschedulable:
        return Observation(Seen.Unschedulable, "Unschedulable",
                           f"pod {unschedulable[0]['name']}: {unschedulable[0]['scheduler_message']}")
    running = [p for p in pods if p["phase"] == "Running"]
    if running and len(running) >= job["replicas"]:
        return Observation(Seen.Running, "Running", None)
    if any(p["phase"] == "Succeeded" for p in pods) and not running:
        return Observation(Seen.Running, "Finishing", "pods have finished; waiting for the job to complete")
    return Observation(Seen.Pending, "Pending", f"{len(running)}/{job['replicas']} pods running")
