"""The kopf operator: small handlers around the Reconciler.

- indexes keep the PyTorchJobs, data-preparation Jobs and pods of every experiment in memory (no list calls per reconcile);
- a timer per Experiment reconciles it every `reconcile_interval` seconds (level-triggered: it also
  creates the jobs of a new experiment on its first tick);
- a pod event handler notes on its job when a pod is taken away (eviction, preemption, node loss),
  because the pod itself may be gone before the next tick;
- where the cluster runs Kueue (asked once, at start-up), indexes of the Workloads of PyTorchJobs and of the
  WorkloadPriorityClasses' names.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import kopf

from dlmctl.spec import GROUP, PLURAL, VERSION
from dlmctl.spec.settings import OperatorSettings

from . import kueue
from .data_jobs import LABEL_DATA, summarize_data_job
from .jobs import JOB_API_VERSION, JOB_GROUP, JOB_KIND, JOB_PLURAL, JOB_VERSION, LABEL_EXPERIMENT, LABEL_RUN
from .metrics import OperatorMetrics
from .observe import pod_disruption, summarize_job, summarize_pod
from .reconcile import JobsApi, Reconciler

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
log = logging.getLogger("dlmctl.operator")


def api_client():
    """The Kubernetes client for this process: in a pod its ServiceAccount, elsewhere the kubeconfig."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


def register(registry: kopf.OperatorRegistry, config: OperatorSettings, metrics: OperatorMetrics,
             kueue_served: bool = False) -> None:
    # kopf authenticates like the Kubernetes client: in-cluster ServiceAccount, else the kubeconfig.
    kopf.on.login(registry=registry)(kopf.login_via_client)

    @kopf.on.startup(id="configure", registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Replicas need distinct priorities: kopf pauses every operator that sees a peer of the same
        # priority, and the one with the highest priority is the active one.
        settings.peering.priority = random.SystemRandom().randint(1, 2**31 - 1)
        settings.peering.lifetime = config.peering_lifetime
        settings.peering.mandatory = True
        settings.scanning.disabled = True  # no dynamic discovery: no need to list CRDs or namespaces
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="dlmctl.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="dlmctl.io", key="last-handled-configuration")
        settings.posting.level = logging.WARNING
        settings.execution.max_workers = config.workers
        # A timer whose run is in progress when its experiment is deleted holds kopf's finalizer until kopf looks
        # again: every cancellation_polling seconds (60 by default), so a deletion could wait a minute.
        settings.background.cancellation_polling = min(1.0, config.reconcile_interval)
        jobs = JobsApi(api_client())
        memo.jobs = jobs
        memo.reconciler = Reconciler(config, jobs, metrics, adopt=lambda child, owner: kopf.adopt(child, owner=owner),
                                     kueue_served=kueue_served)

    @kopf.index(JOB_GROUP, JOB_VERSION, JOB_PLURAL, labels={LABEL_EXPERIMENT: kopf.PRESENT},
                id="jobs_by_experiment", registry=registry)
    def jobs_by_experiment(namespace: str, labels: Any, body: Any, **_: Any):
        return {(namespace, labels[LABEL_EXPERIMENT]): {**summarize_job(body), "run": labels.get(LABEL_RUN)}}

    @kopf.index("batch", "v1", "jobs", labels={LABEL_EXPERIMENT: kopf.PRESENT, LABEL_DATA: kopf.PRESENT},
                id="data_jobs_by_experiment", registry=registry)
    def data_jobs_by_experiment(namespace: str, labels: Any, body: Any, **_: Any):
        return {(namespace, labels[LABEL_EXPERIMENT]): summarize_data_job(body)}

    @kopf.index("pods", labels={LABEL_EXPERIMENT: kopf.PRESENT, LABEL_RUN: kopf.PRESENT},
                id="pods_by_experiment", registry=registry)
    def pods_by_experiment(namespace: str, labels: Any, body: Any, **_: Any):
        return {(namespace, labels[LABEL_EXPERIMENT]): {**summarize_pod(body), "run": labels[LABEL_RUN]}}

    if kueue_served:  # kopf cannot index a resource the cluster does not serve
        @kopf.index(kueue.GROUP, kueue.VERSION, kueue.WORKLOADS, when=_owned_by_pytorchjob,
                    id="workloads_by_job", registry=registry)
        def workloads_by_job(namespace: str, body: Any, **_: Any):
            owner = next(o for o in body["metadata"]["ownerReferences"] if o.get("controller"))
            return {(namespace, owner["name"]): kueue.summarize_workload(_plain(body))}

        @kopf.index(kueue.GROUP, kueue.VERSION, kueue.WORKLOAD_PRIORITY_CLASSES, id="workload_priority_classes",
                    registry=registry)
        def workload_priority_classes(name: str, **_: Any):
            return {"names": name}

    @kopf.timer(GROUP, VERSION, PLURAL, interval=config.reconcile_interval, backoff=config.reconcile_interval,
                id="reconcile", registry=registry)
    def reconcile(body: Any, namespace: str, name: str, patch: kopf.Patch, memo: kopf.Memo,
                  jobs_by_experiment: kopf.Index, pods_by_experiment: kopf.Index,
                  data_jobs_by_experiment: kopf.Index, **kwargs: Any) -> None:
        key = (namespace, name)
        jobs = jobs_by_experiment.get(key, [])
        workloads = []
        if kueue_served:
            index = kwargs["workloads_by_job"]
            workloads = [w for job in jobs for w in index.get((namespace, job["name"]), [])]
            memo.reconciler.workload_priority_classes = frozenset(kwargs["workload_priority_classes"].get("names", []))
        status = memo.reconciler.reconcile(_plain(body), jobs, pods_by_experiment.get(key, []),
                                           data_jobs_by_experiment.get(key, []), workloads)
        if status is not None:
            for field, value in status.items():
                patch.status[field] = value

    @kopf.on.delete(GROUP, VERSION, PLURAL, optional=True, id="forget", registry=registry)
    def forget(uid: str, memo: kopf.Memo, **_: Any) -> None:
        memo.reconciler.forget(uid)

    def disrupted(body: Any, **_: Any) -> bool:
        return pod_disruption(summarize_pod(body)) is not None

    @kopf.on.event("pods", labels={LABEL_RUN: kopf.PRESENT, JOB_NAME_LABEL: kopf.PRESENT}, when=disrupted,
                   id="note_disruption", registry=registry)
    def note_disruption(body: Any, name: str, namespace: str, labels: Any, memo: kopf.Memo, **_: Any) -> None:
        pod = summarize_pod(body)
        reason, message = pod_disruption(pod)
        if pod["job_uid"]:
            memo.jobs.note_disruption(namespace, labels[JOB_NAME_LABEL], pod["job_uid"],
                                      f"{reason}: pod {name}: {message}")


def _owned_by_pytorchjob(body: Any, **_: Any) -> bool:
    return any(o.get("controller") and o.get("kind") == JOB_KIND and o.get("apiVersion") == JOB_API_VERSION
               for o in body.get("metadata", {}).get("ownerReferences") or [])


def _plain(value: Any) -> Any:
    """kopf hands bodies as read-only views; the reconciler works on plain dicts and lists."""
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
