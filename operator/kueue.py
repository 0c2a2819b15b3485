"""Kueue (kueue.x-k8s.io): how a run asks for a queue, and what its Workload says about it.

A run whose spec names `scheduling.queue` gets a PyTorchJob labelled with that LocalQueue and created suspended;
Kueue makes a Workload of it and unsuspends the job only when the quota for *all* its pods is free, so a run starts
whole or waits. When Kueue preempts it for a higher-priority workload it suspends the job again (the pods go, the
trainer checkpoints on SIGTERM) and requeues the Workload; re-admitted, the same job's new pods resume from the
newest verified checkpoint. The operator only reads Workloads, and deactivates one when a run is cancelled; a
waiting run's place in line comes from Kueue's visibility API where the cluster serves it.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from dlmctl.spec import Experiment, Run, SpecError

from .observe import QUEUE_LABEL, job_conditions

log = logging.getLogger("dlmctl.operator")

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
WORKLOADS, LOCAL_QUEUES, WORKLOAD_PRIORITY_CLASSES = "workloads", "localqueues", "workloadpriorityclasses"
LABEL_QUEUE = QUEUE_LABEL
LABEL_PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"
DEACTIVATED = "Deactivated"  # the eviction reason of a Workload whose spec.active we set to false (cancel)
# Kueue's visibility API (an aggregated API server inside Kueue): the Workloads waiting in a queue, in order
VISIBILITY_GROUP, VISIBILITY_VERSION = "visibility.kueue.x-k8s.io", "v1beta2"


def queue_labels(run: Run, workload_priority_classes: frozenset[str] = frozenset()) -> dict[str, str]:
    """The labels that hand a run's job to Kueue. A priority class is named to Kueue only when the cluster has a
    WorkloadPriorityClass of that name (Kueue refuses to make a Workload for an unknown one); otherwise Kueue
    takes the priority from the pods' PriorityClass."""
    scheduling = run.spec.scheduling
    if not scheduling.queue:
        return {}
    labels = {LABEL_QUEUE: scheduling.queue}
    if scheduling.priority_class in workload_priority_classes:
        labels[LABEL_PRIORITY_CLASS] = scheduling.priority_class
    return labels


# -- what a Workload says ------------------------------------------------------------------------------

def summarize_workload(body: dict) -> dict:
    """The few fields of a Workload the operator needs (kept in its in-memory index)."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {}) or {}
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), {})
    evictions = (status.get("schedulingStats") or {}).get("evictions") or []
    return {
        "name": meta.get("name"),
        "job_uid": owner.get("uid"),
        "active": spec.get("active", True) is not False,
        "queue": spec.get("queueName"),
        "cluster_queue": (status.get("admission") or {}).get("clusterQueue"),
        "conditions": job_conditions(status),
        # every time Kueue took the admitted job back (preemption, a stopped queue, ...), except our own cancel
        "evictions": sum(int(e.get("count") or 0) for e in evictions if e.get("reason") != DEACTIVATED),
    }


def workload_of(job: Optional[dict], workloads: list[dict]) -> Optional[dict]:
    """The Workload Kueue made for this very job (not for an earlier job of the same name)."""
    if job is None:
        return None
    return next((w for w in workloads if w["job_uid"] == job["uid"]), None)


def is_true(workload: dict, condition: str) -> bool:
    return workload["conditions"].get(condition, (None,))[0] == "True"


def waiting_words(workload: dict) -> tuple[str, str]:
    """(reason, message) of a Workload that has no quota yet, as Kueue words them."""
    _, reason, message = workload["conditions"].get("QuotaReserved", (None, None, None))
    return reason or "Pending", message or "waiting for quota"


def positions(pending_workloads_summary: dict) -> dict[str, tuple[int, int]]:
    """Workload name -> (place in its ClusterQueue, place in its LocalQueue), 1 = admitted next, from a
    PendingWorkloadsSummary of the visibility API (which counts from 0)."""
    return {w["metadata"]["name"]: (int(w.get("positionInClusterQueue", 0)) + 1,
                                    int(w.get("positionInLocalQueue", 0)) + 1)
            for w in pending_workloads_summary.get("items") or []}


def position_words(queue: str, place: tuple[int, int]) -> str:
    in_cluster_queue, in_local_queue = place
    return f"number {in_cluster_queue} in line in its ClusterQueue ({in_local_queue} in LocalQueue {queue!r})"


def eviction_words(workload: dict) -> tuple[str, str]:
    """(reason, message) of the last time Kueue took the job back: the Preempted condition says by what."""
    _, reason, message = workload["conditions"].get("Evicted", (None, None, None))
    preempted = workload["conditions"].get("Preempted")
    if preempted and preempted[0] == "True" and preempted[2]:
        message = preempted[2]
    return reason or "Preempted", message or "evicted by Kueue"


# -- before anything is created ------------------------------------------------------------------------

def queues(experiment: Experiment) -> list[str]:
    return sorted({run.spec.scheduling.queue for run in experiment.runs() if run.spec.scheduling.queue})


def check_queues(custom_objects, experiment: Experiment, namespace: str) -> None:
    """SpecError unless every LocalQueue the runs name exists in `namespace` (which needs Kueue). A caller who may
    not read LocalQueues is let through: the runs then wait `Queued` with Kueue's own reason."""
    from kubernetes.client.rest import ApiException

    for queue in queues(experiment):
        try:
            custom_objects.get_namespaced_custom_object(GROUP, VERSION, namespace, LOCAL_QUEUES, queue,
                                                        _request_timeout=10)
        except ApiException as err:
            if err.status == 403:
                continue
            if err.status != 404:
                raise
            if not _names_object(err, queue):
                raise SpecError(f"spec.scheduling.queue: {queue!r} names a Kueue LocalQueue, but this cluster has no "
                                f"Kueue ({GROUP}/{VERSION} is not served); install Kueue or remove the queue") from None
            raise SpecError(f"spec.scheduling.queue: Kueue has no LocalQueue {queue!r} in namespace {namespace!r} "
                            f"(`kubectl get localqueues -n {namespace}` lists those there)") from None


def _names_object(err, name: str) -> bool:
    """A 404 for a missing object names it; one for an unknown kind does not."""
    try:
        return (json.loads(err.body or "{}").get("details") or {}).get("name") == name
    except ValueError:
        return False


def wait_until_served(api_client_factory, interval: float, stop) -> bool:
    """Asks every `interval` seconds whether Kueue is served: True once it is, False when `stop` (an Event) is set
    first. A failed ask is asked again."""
    while not stop.wait(interval):
        try:
            with api_client_factory() as api:
                if served(api):
                    return True
        except Exception as err:  # noqa: BLE001 -- the API server may be away for a while; ask again
            log.debug("asking whether Kueue is served: %s", err)
    return False


def served(api_client) -> bool:
    """Whether the cluster serves Kueue's Workloads: asked when the operator starts and, while it is not, every
    kueue_check_interval (wait_until_served) and before a queued run is failed for want of Kueue."""
    from kubernetes import client

    try:
        resources = client.CustomObjectsApi(api_client).get_api_resources(GROUP, VERSION)
    except client.rest.ApiException as err:
        if err.status == 404:
            return False
        raise
    return any(r.name == WORKLOADS for r in resources.resources)
