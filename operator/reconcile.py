"""One look at an Experiment: create the jobs its runs lack, act on what their jobs and pods say, and
compute the status to write. Level-triggered: whatever happened before (an operator killed mid-way, a
lost event), the next look puts things right, and creating a job that exists is a no-op.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Optional

from dlmctl.spec import Experiment, Run, SpecError, experiment_from_dict
from dlmctl.spec.experiment import status_progress
from dlmctl.spec.contracts import DataPhase, ExperimentPhase, RunPhase, experiment_phase
from dlmctl.spec.settings import OperatorSettings

from .jobs import (
    ANNOTATION_CANCEL,
    ANNOTATION_DISRUPTED,
    ANNOTATION_RESTARTS,
    JOB_GROUP,
    JOB_PLURAL,
    JOB_VERSION,
    check_cluster_ready,
    pytorch_job,
    to_dicts,
)
from .data_jobs import data_phase, data_preparation_job, preparations
from . import kueue
from .metrics import OperatorMetrics, experiment_series
from .observe import Observation, Seen, observe
from .progress import ProgressReader

log = logging.getLogger("dlmctl.operator")
UNEXPLAINED_FAILURE_GRACE = 15.0  # seconds to wait for the failed pod's own status before acting on the job's


def now_rfc3339(clock: Callable[[], float] = time.time) -> str:
    return datetime.fromtimestamp(clock(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_experiment(body: dict) -> Experiment:
    """The Experiment as the models read it, from an object the API server returned; SpecError if invalid."""
    meta = body.get("metadata") or {}
    document = {
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if meta.get(k) is not None},
        "spec": body.get("spec") or {},
    }
    experiment = experiment_from_dict(document, f"experiment {meta.get('namespace')}/{meta.get('name')}")
    check_cluster_ready(experiment)
    return experiment


class JobsApi:
    """The few PyTorchJob calls the reconciler makes, through the Kubernetes client."""

    def __init__(self, api_client):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self._exception = client.rest.ApiException

    def create(self, namespace: str, manifest: dict) -> bool:
        """True if created, False if a job of that name already exists. A PyTorchJob, or a batch/v1 Job
        (data preparation)."""
        try:
            if manifest["kind"] == "Job":
                self.batch.create_namespaced_job(namespace, manifest)
            else:
                self.custom.create_namespaced_custom_object(JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, manifest)
            return True
        except self._exception as err:
            if err.status == 409:
                return False
            raise

    def delete(self, namespace: str, name: str, uid: str) -> None:
        """Foreground: the job disappears only after its pods, so a recreated job's pods never meet them."""
        from kubernetes import client

        options = client.V1DeleteOptions(propagation_policy="Foreground",
                                          preconditions=client.V1Preconditions(uid=uid))
        try:
            self.custom.delete_namespaced_custom_object(JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, name,
                                                        body=options)
        except self._exception as err:
            if err.status not in (404, 409):
                raise

    def _unless_gone(self, call: Callable[[], object]) -> None:
        """A change to an object that may have been deleted meanwhile: then there is nothing to change."""
        try:
            call()
        except self._exception as err:
            if err.status != 404:
                raise

    def suspend(self, namespace: str, name: str) -> None:
        """Suspended, the training-operator deletes the job's pods: their GPUs are free, the job stays."""
        self._unless_gone(lambda: self.custom.patch_namespaced_custom_object(
            JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, name, {"spec": {"runPolicy": {"suspend": True}}}))

    def deactivate_workload(self, namespace: str, name: str) -> None:
        """Kueue unsuspends a suspended job whose Workload is admitted: an inactive Workload is evicted for good."""
        self._unless_gone(lambda: self.custom.patch_namespaced_custom_object(
            kueue.GROUP, kueue.VERSION, namespace, kueue.WORKLOADS, name, {"spec": {"active": False}}))

    def queue_positions(self, namespace: str, queue: str) -> dict[str, tuple[int, int]]:
        """Workload name -> its place in line, for the Workloads waiting in a LocalQueue, as Kueue's visibility API
        reports them; empty where that API is not served, not reachable or not ours to read."""
        from urllib3.exceptions import HTTPError

        path = (f"/apis/{kueue.VISIBILITY_GROUP}/{kueue.VISIBILITY_VERSION}/namespaces/{{namespace}}/"
                f"{kueue.LOCAL_QUEUES}/{{name}}/pendingworkloads")
        try:
            summary = self.custom.api_client.call_api(
                path, "GET", path_params={"namespace": namespace, "name": queue}, response_type="object",
                auth_settings=["BearerToken"], _return_http_data_only=True, _request_timeout=5)
        except (self._exception, HTTPError) as err:
            log.debug("no queue positions for %s/%s: %s", namespace, queue, err)
            return {}
        return kueue.positions(summary or {})

    def kueue_served(self) -> bool:
        return kueue.served(self.custom.api_client)

    def suspend_data_job(self, namespace: str, name: str) -> None:
        """A suspended batch Job's pods are deleted; it keeps its completed indexes."""
        self._unless_gone(lambda: self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": True}}))

    def note_disruption(self, namespace: str, name: str, job_uid: str, note: str) -> None:
        """Remember on the job itself that one of its pods was taken away (the pod may vanish at once)."""
        try:
            job = self.custom.get_namespaced_custom_object(JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, name)
        except self._exception as err:
            if err.status == 404:
                return
            raise
        meta = job.get("metadata", {})
        if meta.get("uid") != job_uid or meta.get("deletionTimestamp") or ANNOTATION_DISRUPTED in (meta.get("annotations") or {}):
            return
        self.custom.patch_namespaced_custom_object(JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, name,
                                                   {"metadata": {"annotations": {ANNOTATION_DISRUPTED: note}}})


class Reconciler:
    def __init__(self, config: OperatorSettings, jobs: JobsApi, metrics: OperatorMetrics,
                 adopt: Callable[[dict, dict], None], progress: Optional[ProgressReader] = None,
                 clock: Callable[[], float] = time.time, kueue_served: bool = False):
        """`kueue_served`: whether the cluster runs Kueue (queued runs fail at once without it)."""
        self.config, self.jobs, self.metrics, self.adopt, self.clock = config, jobs, metrics, adopt, clock
        self.kueue_served = kueue_served
        self.workload_priority_classes: frozenset[str] = frozenset()  # kept current by the operator's index
        self.progress = progress or ProgressReader()
        self._recreate_after: dict[tuple[str, str], float] = {}
        self._progress_read_at: dict[tuple[str, str], float] = {}
        self._evals: dict[tuple[str, str], list] = {}  # (namespace, run) -> its evaluations, for the crossover
        self._runs_of: dict[str, tuple[str, list[str]]] = {}  # experiment uid -> (namespace, its run names)
        self._deleted: set[str] = set()  # uids of jobs deleted here, until the index shows them going
        self._unexplained_since: dict[str, float] = {}  # job uid -> when it was first seen Failed without a why
        # A look whose inputs are what the last one saw, before anything it waits for is due, changes nothing:
        # experiment uid -> (inputs, when the next look must happen anyway). Keeps 1000 idle experiments cheap.
        self._last_look: dict[str, tuple[str, float]] = {}
        self._due: list[float] = []
        self._positions: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}  # this look's places in line

    # -- the whole experiment -------------------------------------------------------------------
    def reconcile(self, body: dict, jobs: Iterable[dict], pods: Iterable[dict],
                  data_jobs: Iterable[dict] = (), workloads: Iterable[dict] = ()) -> Optional[dict]:
        """The experiment's new status, or None when nothing changed. `jobs` are its PyTorchJobs, `data_jobs`
        its data-preparation Jobs, `workloads` the Kueue Workloads of its jobs (summaries)."""
        jobs, pods, data_jobs, meta = list(jobs), list(pods), list(data_jobs), body["metadata"]
        workloads = list(workloads)
        inputs = repr((meta.get("generation"), meta.get("labels"), meta.get("annotations"), jobs, pods, data_jobs,
                       workloads, (body.get("status") or {}).get("phase")))
        last = self._last_look.get(meta.get("uid"))
        if last is not None and last[0] == inputs and self.clock() < last[1]:
            return None
        started = time.perf_counter()
        self._due = [self.clock() + self.config.progress_interval]
        self._positions = {}
        try:
            status = self._reconcile(body, jobs, pods, data_jobs, workloads)
        except Exception:
            self.metrics.reconcile_errors.inc()
            self._last_look.pop(meta.get("uid"), None)
            raise
        finally:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        settled = status.get("phase") in {p.value for p in ExperimentPhase if p.terminal}
        self._last_look[meta.get("uid")] = (inputs, float("inf") if settled else min(self._due))
        old = body.get("status") or {}
        return None if _same(status, old) else status

    def forget(self, uid: str) -> None:
        """The experiment is gone: so are its series and what was kept of its runs' progress."""
        self._last_look.pop(uid, None)
        self.metrics.forget(uid)
        namespace, runs = self._runs_of.pop(uid, ("", []))
        for name in runs:
            self._evals.pop((namespace, name), None)
            self._progress_read_at.pop((namespace, name), None)

    def _reconcile(self, body: dict, jobs: list[dict], pods: list[dict], data_jobs: list[dict],
                   workloads: list[dict]) -> dict:
        meta, old = body["metadata"], dict(body.get("status") or {})
        generation = meta.get("generation")
        namespace = meta["namespace"]
        try:  # well under a millisecond; a look whose inputs did not change never gets here
            experiment = parse_experiment(body)
        except SpecError as err:
            self.metrics.show(meta.get("uid"), experiment_series(namespace, meta["name"], [], [], pods, {}))
            return self._invalid(old, str(err), generation)
        accepted = old.get("observedGeneration") or generation
        spec_changed = generation is not None and accepted is not None and generation != accepted
        cancel = (meta.get("annotations") or {}).get(ANNOTATION_CANCEL)
        jobs_by_run = {j["run"]: j for j in jobs}
        pods_by_run: dict[str, list[dict]] = {}
        for pod in pods:
            pods_by_run.setdefault(pod["run"], []).append(pod)
        previous = {r.get("name"): r for r in old.get("runs") or []}
        runs, statuses = experiment.runs(), []
        data = self._data_preparations(body, experiment, runs, old, data_jobs, cancel, may_create=not spec_changed)
        data_of_run = {name: prep for prep in data for name in prep["runs"]}
        for run in runs:
            current = dict(previous.get(run.name) or {"name": run.name, "arm": run.arm.value, "phase": "Pending"})
            job = jobs_by_run.get(run.name)
            current = self._run(body, experiment, run, current, job, pods_by_run.get(run.name, []), cancel,
                                may_create=not spec_changed, data=data_of_run.get(run.name),
                                workload=kueue.workload_of(job, workloads))
            statuses.append(current)
        self._runs_of[meta.get("uid")] = (namespace, [run.name for run in runs])
        evals = {run.name: self._evals.get((namespace, run.name), []) for run in runs}
        self.metrics.show(meta.get("uid"), experiment_series(namespace, meta["name"], runs, statuses, pods, evals))
        return self._experiment_status(old, statuses, accepted, spec_changed, cancel, data)

    def _invalid(self, old: dict, message: str, generation) -> dict:
        return {
            "phase": "Invalid", "runs": [], "progress": "0/0", "observedGeneration": generation,
            "conditions": [_condition(old, "Valid", "False", "InvalidSpec", message, self.clock)],
        }

    def _experiment_status(self, old: dict, runs: list[dict], accepted, spec_changed: bool, cancel,
                           data: list[dict]) -> dict:
        phase = experiment_phase(r["phase"] for r in runs)
        conditions = [_condition(old, "Valid", "True", "Accepted", "the spec is valid; one PyTorchJob per run",
                                 self.clock)]
        if spec_changed:
            conditions.append(_condition(
                old, "SpecChangeRejected", "True", "Immutable",
                "spec changed after submission; runs are immutable and keep the submitted spec: resubmit with "
                "`dlmctl submit --replace`", self.clock))
        if cancel:
            conditions.append(_condition(old, "Cancelled", "True", "CancelRequested",
                                         f"cancelled at {cancel}; checkpoints are kept", self.clock))
        starts = [r["startTime"] for r in runs if r.get("startTime")]
        ends = [r["completionTime"] for r in runs if r.get("completionTime")]
        status = {
            "phase": phase.value,
            "runs": runs,
            "data": data or None,
            "conditions": conditions,
            "progress": f"{sum(r['phase'] == 'Succeeded' for r in runs)}/{len(runs)}",
            "observedGeneration": accepted,
            "startTime": old.get("startTime") or (min(starts) if starts else None),
            "completionTime": (old.get("completionTime") or max(ends)) if phase.terminal and ends else None,
        }
        return {k: v for k, v in status.items() if v is not None}

    # -- one run --------------------------------------------------------------------------------
    def _run(self, body: dict, experiment: Experiment, run: Run, status: dict, job: Optional[dict],
             pods: list[dict], cancel: Optional[str], may_create: bool, data: Optional[dict] = None,
             workload: Optional[dict] = None) -> dict:
        namespace = body["metadata"]["namespace"]
        key = (namespace, run.name)
        phase = RunPhase(status.get("phase", "Pending"))
        # a job carries the restarts of the run before it; Kueue counts the times it took this job back
        counted = int(status.get("restarts") or 0)
        carried = int((job or {}).get("annotations", {}).get(ANNOTATION_RESTARTS) or 0)
        evictions = workload["evictions"] if workload else 0
        restarts = max(counted, carried + evictions)
        status["restarts"] = restarts
        status.pop("queue_position", None)  # only while it waits, set anew at each look
        if phase.terminal:
            return self._with_progress(run, status, final=True)
        # the evictions the status has not counted yet are new preemptions (an operator restarted in between
        # reads them from the status, so none is counted twice)
        new_preemptions = evictions - max(counted - carried, 0)
        if new_preemptions > 0:
            self.metrics.runs_preempted.inc(new_preemptions)
        if cancel:
            if workload and workload["active"]:
                self.jobs.deactivate_workload(namespace, workload["name"])
            if job and not job["deleting"] and not job["suspended"]:
                self.jobs.suspend(namespace, job["name"])
            return self._finish(run, status, RunPhase.Cancelled, "Cancelled",
                                "cancelled by `dlmctl cancel`; its checkpoints are kept")
        # the spec's queue, or the one Kueue gave the job (a namespace's LocalQueue named "default" takes the
        # jobs that name none)
        queue = run.spec.scheduling.queue or (job or {}).get("queue")
        if queue:
            status["queue"] = queue
            if run.spec.scheduling.queue and not self.kueue_served and job is None:
                if self.jobs.kueue_served():
                    return _set(status, RunPhase.Queued, "WaitingForKueue",
                                "Kueue was installed after the operator started; the operator restarts to follow it")
                self.metrics.runs_failed.inc()
                return self._finish(run, status, RunPhase.Failed, "KueueNotInstalled",
                                    f"spec.scheduling.queue: {run.spec.scheduling.queue!r} names a Kueue LocalQueue, "
                                    f"but this cluster has no Kueue ({kueue.GROUP} is not served)")
        if job and job["uid"] in self._deleted:
            if not job["deleting"]:
                return status  # our delete is on its way; the index has not seen it yet
            self._deleted.discard(job["uid"])
        obs = observe(job, pods, (job or {}).get("annotations", {}).get(ANNOTATION_DISRUPTED))
        if obs.seen not in (Seen.Running, Seen.Pending, Seen.NoJob):
            log.info("run %s/%s: %s %s: %s (job %s, pods %s)", namespace, run.name, obs.seen.value, obs.reason,
                     obs.message, job, pods)
        max_restarts = run.spec.scheduling.max_restarts
        if queue and job and not job["deleting"]:
            queued = self._queued(namespace, queue, run, status, job, workload, obs)
            if queued is not None:
                return queued
        if obs.seen is Seen.FailedUnexplained:
            since = self._unexplained_since.setdefault(job["uid"], self.clock())
            if self.clock() - since < UNEXPLAINED_FAILURE_GRACE:
                self._due.append(since + UNEXPLAINED_FAILURE_GRACE)
                return status  # the pod's failure (and its exit code) is usually a moment behind the job's
            obs = Observation(Seen.Failed, obs.reason, obs.message)
        if obs.seen is Seen.NoJob:
            if data is not None and data["phase"] != DataPhase.Succeeded.value:  # its tokens are not ready
                if data["phase"] == DataPhase.Failed.value:
                    self.metrics.runs_failed.inc()
                    return self._finish(run, status, RunPhase.Failed, "DataPreparationFailed",
                                        f"data preparation {data['name']} failed: {data.get('message')}")
                return _set(status, RunPhase.Pending, "PreparingData",
                            f"waiting for data preparation {data['name']}: {data.get('message')}")
            if phase in (RunPhase.Preempted, RunPhase.Restarting):
                if self.clock() < self._recreate_after.get(key, 0) or not may_create:
                    self._due.append(self._recreate_after.get(key, 0))
                    return status
                self._create(body, experiment, run, restarts)
                self.metrics.jobs_recreated.inc()
                return status
            if may_create and self._create(body, experiment, run, restarts):
                self.metrics.jobs_created.inc()
            return _set(status, RunPhase.Pending, "JobCreated", "waiting for its pods to be scheduled")
        if obs.seen is Seen.Deleting:
            return status  # a job being replaced: Preempted/Restarting until it is gone
        if obs.seen is Seen.Succeeded:
            return self._finish(run, status, RunPhase.Succeeded, obs.reason, obs.message)
        if obs.seen is Seen.FailedPermanently:
            self.jobs.suspend(namespace, job["name"])
            self.metrics.runs_failed.inc()
            return self._finish(run, status, RunPhase.Failed, obs.reason, f"{obs.message}; not retried")
        if obs.seen in (Seen.Disrupted, Seen.Failed):
            next_phase = RunPhase.Preempted if obs.seen is Seen.Disrupted else RunPhase.Restarting
            if obs.seen is Seen.Disrupted:
                self.metrics.runs_preempted.inc()
            if restarts >= max_restarts:
                self.metrics.runs_failed.inc()
                self.jobs.suspend(namespace, job["name"])
                return self._finish(run, status, RunPhase.Failed, "RestartLimitReached",
                                    f"{obs.message}; already restarted {restarts} times "
                                    f"(spec.scheduling.max_restarts: {max_restarts})")
            self.jobs.delete(namespace, job["name"], job["uid"])
            self._deleted.add(job["uid"])
            backoff = self.config.backoff(restarts)
            self._recreate_after[key] = self.clock() + backoff
            status["restarts"] = restarts + 1
            return _set(status, next_phase, obs.reason,
                        f"{obs.message}; recreating in {backoff:.0f}s (restart {restarts + 1} of {max_restarts}), "
                        "resuming from its last verified checkpoint")
        if obs.seen is Seen.Unschedulable:
            return _set(status, RunPhase.Unschedulable, obs.reason, obs.message)
        if obs.seen is Seen.Running:
            status.setdefault("startTime", now_rfc3339(self.clock))
            return self._with_progress(run, _set(status, RunPhase.Running, obs.reason, obs.message))
        reason = "Suspended" if obs.seen is Seen.Suspended else obs.reason
        return _set(status, RunPhase.Pending, reason, obs.message)

    def _queued(self, namespace: str, queue: str, run: Run, status: dict, job: dict, workload: Optional[dict],
                obs: Observation) -> Optional[dict]:
        """The status of a run while Kueue holds its job (waiting for quota, admitted, taken back), else None:
        once its pods run, a queued run is followed like any other."""
        if workload is None:
            if not job["suspended"]:
                return None
            return _set(status, RunPhase.Queued, "WaitingForKueue",
                        f"waiting for Kueue to take job {job['name']} into LocalQueue {queue!r}")
        if workload["cluster_queue"]:
            status["cluster_queue"] = workload["cluster_queue"]
        admitted = kueue.is_true(workload, "Admitted")
        if kueue.is_true(workload, "Evicted") or (not admitted and workload["evictions"]):
            return self._preempted(namespace, run, status, workload)
        if not admitted:
            reason, message = kueue.waiting_words(workload)
            place = self._queue_positions(namespace, queue).get(workload["name"])
            if place:
                status["queue_position"] = place[0]
                message = f"{kueue.position_words(queue, place)}: {message}"
            return _set(status, RunPhase.Queued, reason, message)
        if obs.seen in (Seen.Suspended, Seen.Pending):
            waiting = "its pods are being created" if obs.seen is Seen.Suspended else obs.message
            return _set(status, RunPhase.Admitted, "Admitted",
                        f"admitted whole by ClusterQueue {workload['cluster_queue']}; {waiting}")
        return None

    def _queue_positions(self, namespace: str, queue: str) -> dict[str, tuple[int, int]]:
        """Asked once per queue per look; a waiting run's place is refreshed at every look (each progress
        interval at the latest), as the runs ahead of it are admitted."""
        if (namespace, queue) not in self._positions:
            self._positions[(namespace, queue)] = self.jobs.queue_positions(namespace, queue)
        return self._positions[(namespace, queue)]

    def _preempted(self, namespace: str, run: Run, status: dict, workload: dict) -> dict:
        """Kueue took the admitted job back (a higher-priority workload, a stopped queue): it suspended the job, so
        its pods are gone or going (the trainer checkpoints on SIGTERM), and requeued the Workload. Admitted again,
        the same job's new pods resume from the newest verified checkpoint."""
        reason, message = kueue.eviction_words(workload)
        restarts, max_restarts = status["restarts"], run.spec.scheduling.max_restarts
        if restarts > max_restarts:
            self.jobs.deactivate_workload(namespace, workload["name"])
            self.metrics.runs_failed.inc()
            return self._finish(run, status, RunPhase.Failed, "RestartLimitReached",
                                f"{message}; taken back {restarts} times (spec.scheduling.max_restarts: {max_restarts})")
        return _set(status, RunPhase.Preempted, reason,
                    f"{message}; queued again (restart {restarts} of {max_restarts}), resumes from its last verified "
                    "checkpoint when Kueue admits it again")

    # -- data preparations ---------------------------------------------------------------------
    def _data_preparations(self, body: dict, experiment: Experiment, runs: list[Run], old: dict,
                           data_jobs: list[dict], cancel: Optional[str], may_create: bool) -> list[dict]:
        previous = {d.get("name"): d for d in old.get("data") or []}
        jobs_by_name = {j["name"]: j for j in data_jobs}
        statuses = []
        for name, group in preparations(runs).items():
            status = dict(previous.get(name) or {"name": name, "phase": DataPhase.Pending.value})
            status.update(runs=[run.name for run in group], workers=group[0].spec.data.preparation.workers)
            statuses.append(self._data(body, experiment, group[0], status, jobs_by_name.get(name), cancel, may_create))
        return statuses

    def _data(self, body: dict, experiment: Experiment, run: Run, status: dict, job: Optional[dict],
              cancel: Optional[str], may_create: bool) -> dict:
        """One data preparation: create its Job, follow it. Once finished it stays finished, its Job or not."""
        if DataPhase(status["phase"]).terminal:
            return status
        if cancel:
            if job and not job["deleting"] and not job["suspended"]:
                self.jobs.suspend_data_job(body["metadata"]["namespace"], job["name"])
            status.setdefault("completionTime", now_rfc3339(self.clock))
            return _set(status, DataPhase.Cancelled, "Cancelled", "cancelled by `dlmctl cancel`")
        if job is None or job["deleting"]:
            if job is None and may_create and self._create_data_job(body, experiment, run):
                self.metrics.jobs_created.inc()
            return _set(status, DataPhase.Pending, "JobCreated", f"waiting for its {status['workers']} pods")
        phase, reason, message = data_phase(job)
        status["completed"] = job["succeeded"]
        if phase is not DataPhase.Pending:
            status.setdefault("startTime", now_rfc3339(self.clock))
        if phase.terminal:
            status.setdefault("completionTime", now_rfc3339(self.clock))
        return _set(status, phase, reason, message)

    def _create_data_job(self, body: dict, experiment: Experiment, run: Run) -> bool:
        (manifest,) = to_dicts([data_preparation_job(run, experiment.metadata.labels)])
        self.adopt(manifest, body)
        created = self.jobs.create(body["metadata"]["namespace"], manifest)
        if created:
            log.info("created data-preparation Job %s/%s", body["metadata"]["namespace"], manifest["metadata"]["name"])
        return created

    def _create(self, body: dict, experiment: Experiment, run: Run, restarts: int) -> bool:
        (manifest,) = to_dicts([pytorch_job(run, experiment.metadata.labels, self.workload_priority_classes)])
        if restarts:
            manifest["metadata"].setdefault("annotations", {})[ANNOTATION_RESTARTS] = str(restarts)
        self.adopt(manifest, body)
        created = self.jobs.create(body["metadata"]["namespace"], manifest)
        if created:
            log.info("created PyTorchJob %s/%s (restarts %d)", body["metadata"]["namespace"], run.name, restarts)
        return created

    def _finish(self, run: Run, status: dict, phase: RunPhase, reason, message) -> dict:
        status.setdefault("completionTime", now_rfc3339(self.clock))
        return self._with_progress(run, _set(status, phase, reason, message), final=True)

    def _with_progress(self, run: Run, status: dict, final: bool = False) -> dict:
        """Refresh the metrics fields from the run's store, at most every progress_interval (and once more
        when the run has finished)."""
        key = (run.namespace or "", run.name)
        last = self._progress_read_at.get(key)
        if last == float("inf") or (last is not None and self.clock() - last < self.config.progress_interval):
            return status
        self._progress_read_at[key] = self.clock()  # failures wait for the next interval too
        try:
            progress = self.progress.read(run)
        except Exception as err:  # the store is down or the credentials are wrong: say so, keep going
            log.warning("run %s: cannot read progress from its store: %s", run.name, err)
            return status
        if final:
            self._progress_read_at[key] = float("inf")
        if progress is not None:
            status.update(status_progress(progress))
            self._evals[key] = progress.evals
        return status


def _set(status: dict, phase: RunPhase | DataPhase, reason: Optional[str], message: Optional[str]) -> dict:
    status["phase"] = phase.value
    status["reason"] = reason
    status["message"] = message
    return {k: v for k, v in status.items() if v is not None}


def _condition(old: dict, type_: str, value: str, reason: str, message: str, clock) -> dict[str, Any]:
    """A condition keeps its lastTransitionTime while its status does not change."""
    previous = next((c for c in old.get("conditions") or [] if c.get("type") == type_), None)
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == value else None
    return {"type": type_, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": since or now_rfc3339(clock)}


def _same(new: dict, old: dict) -> bool:
    return new == {k: v for k, v in old.items() if k in new or v is not None}
