"""Queued runs on a shared cluster: Kueue admits each run's PyTorchJob whole or not at all, and the operator
shows what Kueue decided (Queued, Admitted, Preempted) and resumes a preempted run when Kueue admits it again.

The first part drives the Reconciler with Workloads shaped as Kueue v1beta2 writes them; the second runs the real
control plane with the real Kueue (tests/testenv) and KWOK GPU nodes."""
from __future__ import annotations

import copy
from pathlib import Path

import kopf
import pytest

from dlmctl.operator.jobs import ANNOTATION_CANCEL
from dlmctl.operator.kueue import LABEL_QUEUE, positions, summarize_workload
from dlmctl.operator.metrics import OperatorMetrics
from dlmctl.operator.observe import summarize_job, summarize_pod
from dlmctl.operator.reconcile import Reconciler
from dlmctl.spec.settings import OperatorSettings
from test_reconcile import NoProgress, RecordedJobs

SPEC = {"arms": ["diffusion"], "model": {"preset": "nano"}, "data": {"unique_tokens": 8192, "seq_len": 64},
        "checkpoint": {"uri": "s3://bucket/exp"}, "resources": {"gpus_per_node": 8, "nodes": 2},
        "batch": {"global_sequences": 128, "micro_batch_sequences": 8},
        "scheduling": {"queue": "team", "max_restarts": 2}}
RUN = "exp-dlm"


class RecordedCalls(RecordedJobs):
    def __init__(self):
        super().__init__()
        self.deactivated, self.asked_positions = [], []
        self.pending = {}  # what Kueue's visibility API answers for a LocalQueue: a PendingWorkloadsSummary
        self.kueue_now_served = False  # whether the cluster serves Kueue when asked again

    def deactivate_workload(self, namespace, name):
        self.deactivated.append(name)

    def kueue_served(self):
        return self.kueue_now_served

    def queue_positions(self, namespace, queue):
        self.asked_positions.append((namespace, queue))
        return positions(self.pending.get(queue, {}))


def reconciler(kueue_served=True):
    calls = RecordedCalls()
    config = OperatorSettings(metrics_port=0, health_port=0)
    r = Reconciler(config, calls, OperatorMetrics(), adopt=lambda child, owner: kopf.adopt(child, owner=owner),
                   progress=NoProgress(), kueue_served=kueue_served)
    return r, calls


def experiment_body(**spec) -> dict:
    return {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": "exp", "namespace": "ns", "uid": "exp-uid", "generation": 1},
            "spec": {**copy.deepcopy(SPEC), **spec}}


def job(manifest: dict, uid: str = "job-1", suspended: bool = True) -> dict:
    body = copy.deepcopy(manifest)
    body["metadata"]["uid"] = uid
    body["spec"]["runPolicy"]["suspend"] = suspended
    return {**summarize_job(body), "run": body["metadata"]["name"]}


def condition(type_: str, status: str, reason: str, message: str) -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-12-07T07:00:00Z", "observedGeneration": 1}


def workload(job_uid: str = "job-1", conditions=(), evictions=(), cluster_queue=None, active=True) -> dict:
    """A Workload as Kueue v1beta2 writes it for a PyTorchJob."""
    status = {"conditions": list(conditions)}
    if cluster_queue:
        status["admission"] = {"clusterQueue": cluster_queue, "podSetAssignments": []}
    if evictions:
        status["schedulingStats"] = {"evictions": [
            {"reason": reason, "underlyingCause": "", "count": count} for reason, count in evictions]}
    return summarize_workload({
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
        "metadata": {"name": f"pytorchjob-{RUN}-1a2b3", "namespace": "ns",
                     "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": RUN,
                                          "uid": job_uid, "controller": True}]},
        "spec": {"queueName": "team", "active": active, "podSets": []},
        "status": status,
    })


NO_QUOTA = condition("QuotaReserved", "False", "Pending",
                     "couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu in "
                     "flavor gpu, 8 more needed")
RESERVED = condition("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus")
ADMITTED = condition("Admitted", "True", "Admitted", "The workload is admitted")
NOT_ADMITTED = condition("Admitted", "False", "NoReservation", "The workload has no reservation")
EVICTED = condition("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority Workload")
PREEMPTED = condition("Preempted", "True", "InClusterQueue",
                      "Preempted to accommodate a workload (UID: u, JobUID: j) due to prioritization in the "
                      "ClusterQueue")
READMITTED = [RESERVED, ADMITTED, condition("Evicted", "False", "QuotaReserved", "Previously: Preempted"),
              condition("Preempted", "False", "QuotaReserved", "Previously: InClusterQueue")]


def running_pods(job_uid: str = "job-1") -> list[dict]:
    return [{**summarize_pod({
        "metadata": {"name": f"{RUN}-{kind}-0", "ownerReferences": [{"uid": job_uid, "controller": True}]},
        "spec": {"nodeName": f"kwok-gpu-{i}"}, "status": {"phase": "Running"},
    }), "run": RUN} for i, kind in enumerate(("master", "worker"))]


def look(r, body, jobs=(), pods=(), workloads=()) -> dict:
    """One reconcile, the status written back as the operator does; the run's status."""
    status = r.reconcile(body, list(jobs), list(pods), [], list(workloads))
    if status is not None:
        body["status"] = status
    (run,) = body["status"]["runs"]
    return run


def created_job(r, calls) -> tuple[dict, dict]:
    body = experiment_body()
    look(r, body)
    (manifest,) = calls.created
    return body, manifest


def test_a_queued_run_is_created_suspended_and_waits_queued_with_kueues_reason():
    r, calls = reconciler()
    body, manifest = created_job(r, calls)
    assert manifest["metadata"]["labels"][LABEL_QUEUE] == "team" and manifest["spec"]["runPolicy"]["suspend"] is True
    run = look(r, body, [job(manifest)])
    assert (run["phase"], run["reason"], run["queue"]) == ("Queued", "WaitingForKueue", "team")
    run = look(r, body, [job(manifest)], workloads=[workload(conditions=[NO_QUOTA])])
    assert (run["phase"], run["reason"]) == ("Queued", "Pending")
    assert "insufficient unused quota for nvidia.com/gpu" in run["message"]
    assert body["status"]["phase"] == "Pending" and run["restarts"] == 0
    assert calls.deleted == calls.suspended == [] and len(calls.created) == 1


def pending_workloads(*names_in_line: str) -> dict:
    """A PendingWorkloadsSummary as Kueue's visibility API answers it for LocalQueue "team" of ClusterQueue "gpus",
    where another namespace's Workload is first in line (positions count from 0)."""
    return {"kind": "PendingWorkloadsSummary", "apiVersion": "visibility.kueue.x-k8s.io/v1beta2", "metadata": {},
            "items": [{"metadata": {"name": name, "namespace": "ns", "creationTimestamp": "2026-12-07T07:00:00Z"},
                       "priority": 0, "localQueueName": "team", "positionInClusterQueue": i + 1,
                       "positionInLocalQueue": i} for i, name in enumerate(names_in_line)]}


def test_a_waiting_run_shows_its_place_in_line_as_kueues_visibility_api_reports_it():
    r, calls = reconciler()
    body, manifest = created_job(r, calls)
    waiting = workload(conditions=[NO_QUOTA])
    calls.pending["team"] = pending_workloads("pytorchjob-other-00000", waiting["name"])
    run = look(r, body, [job(manifest)], workloads=[waiting])
    assert (run["phase"], run["queue_position"]) == ("Queued", 3)  # behind 2: one of another namespace, one here
    assert run["message"].startswith("number 3 in line in its ClusterQueue (2 in LocalQueue 'team'): couldn't assign")
    calls.pending["team"] = pending_workloads(waiting["name"])
    r.clock = lambda: 1e12  # the next progress interval: its place is asked again though no input changed
    run = look(r, body, [job(manifest)], workloads=[waiting])
    assert run["queue_position"] == 2 and calls.asked_positions == [("ns", "team")] * 2
    admitted = workload(conditions=[RESERVED, ADMITTED], cluster_queue="gpus")
    run = look(r, body, [job(manifest)], workloads=[admitted])
    assert run["phase"] == "Admitted" and "queue_position" not in run


def test_without_kueues_visibility_api_a_waiting_run_has_no_place_but_kueues_reason():
    r, calls = reconciler()  # queue_positions answers nothing: the API is not served, or not ours to read
    body, manifest = created_job(r, calls)
    run = look(r, body, [job(manifest)], workloads=[workload(conditions=[NO_QUOTA])])
    assert run["phase"] == "Queued" and "queue_position" not in run
    assert run["message"] == NO_QUOTA["message"]


def test_an_admitted_run_is_admitted_until_all_its_pods_run():
    r, calls = reconciler()
    body, manifest = created_job(r, calls)
    admitted = workload(conditions=[RESERVED, ADMITTED], cluster_queue="gpus")
    run = look(r, body, [job(manifest)], workloads=[admitted])  # Kueue has yet to unsuspend the job
    assert (run["phase"], run["cluster_queue"]) == ("Admitted", "gpus")
    run = look(r, body, [job(manifest, suspended=False)], running_pods()[:1], [admitted])
    assert run["phase"] == "Admitted" and "1/2 pods running" in run["message"]
    run = look(r, body, [job(manifest, suspended=False)], running_pods(), [admitted])
    assert run["phase"] == "Running" and body["status"]["phase"] == "Running"


def test_a_run_kueue_preempts_is_preempted_then_resumes_in_the_same_job_counting_one_restart_per_preemption():
    r, calls = reconciler()
    body, manifest = created_job(r, calls)
    first = [RESERVED, ADMITTED]
    look(r, body, [job(manifest, suspended=False)], running_pods(), [workload(conditions=first, cluster_queue="gpus")])
    # Kueue evicts it for a higher-priority workload: the job is suspended, its pods go (the trainer checkpoints)
    evicted = workload(conditions=[RESERVED, ADMITTED, EVICTED, PREEMPTED], evictions=[("Preempted", 1)],
                       cluster_queue="gpus")
    run = look(r, body, [job(manifest, suspended=True)], [], [evicted])
    assert (run["phase"], run["reason"], run["restarts"]) == ("Preempted", "Preempted", 1)
    assert "prioritization in the ClusterQueue" in run["message"] and "resumes from its last verified" in run["message"]
    requeued = workload(conditions=[NO_QUOTA, NOT_ADMITTED, EVICTED, PREEMPTED], evictions=[("Preempted", 1)])
    for _ in range(3):  # looked at again and again while it waits: still one restart
        run = look(r, body, [job(manifest, suspended=True)], [], [requeued])
        assert (run["phase"], run["restarts"]) == ("Preempted", 1)
    readmitted = workload(conditions=READMITTED, evictions=[("Preempted", 1)], cluster_queue="gpus")
    run = look(r, body, [job(manifest, suspended=False)], running_pods(), [readmitted])
    assert (run["phase"], run["restarts"]) == ("Running", 1)
    # the operator neither deleted nor recreated the job: Kueue suspends and resumes it
    assert calls.deleted == [] and len(calls.created) == 1
    again = workload(conditions=[RESERVED, ADMITTED, EVICTED, PREEMPTED], evictions=[("Preempted", 2)])
    run = look(r, body, [job(manifest, suspended=True)], [], [again])
    assert (run["phase"], run["restarts"]) == ("Preempted", 2)
    assert r.metrics.runs_preempted._value.get() == 2


def test_each_preemption_is_counted_once_even_across_an_operator_restart_or_between_two_looks():
    r, calls = reconciler()
    body, manifest = created_job(r, calls)
    evicted = workload(conditions=[RESERVED, ADMITTED, EVICTED, PREEMPTED], evictions=[("Preempted", 1)])
    look(r, body, [job(manifest, suspended=True)], [], [evicted])
    restarted, _ = reconciler()  # a new operator process: it knows only what the experiment's status says
    run = look(restarted, body, [job(manifest, suspended=True)], [], [evicted])
    assert (run["phase"], run["restarts"]) == ("Preempted", 1)
    assert restarted.metrics.runs_preempted._value.get() == 0
    # taken back and admitted again between two looks: never seen Preempted, still one restart and one preemption
    readmitted = workload(conditions=READMITTED, evictions=[("Preempted", 2)], cluster_queue="gpus")
    run = look(restarted, body, [job(manifest, suspended=False)], running_pods(), [readmitted])
    assert (run["phase"], run["restarts"]) == ("Running", 2)
    assert restarted.metrics.runs_preempted._value.get() == 1


def test_preempted_more_often_than_max_restarts_the_run_fails_and_its_workload_is_deactivated():
    r, calls = reconciler()
    body, manifest = created_job(r, calls)
    evicted = workload(conditions=[NO_QUOTA, EVICTED, PREEMPTED], evictions=[("Preempted", 3)])  # max_restarts 2
    run = look(r, body, [job(manifest)], [], [evicted])
    assert (run["phase"], run["reason"]) == ("Failed", "RestartLimitReached")
    assert calls.deactivated == [evicted["name"]]


def test_a_failure_after_admission_is_the_operators_to_retry_in_a_new_job():
    r, calls = reconciler()
    body, manifest = created_job(r, calls)
    failed = [{**summarize_pod({
        "metadata": {"name": f"{RUN}-master-0", "ownerReferences": [{"uid": "job-1", "controller": True}]},
        "spec": {"nodeName": "n"},
        "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 1}}}]},
    }), "run": RUN}]
    run = look(r, body, [job(manifest, suspended=False)], failed,
               [workload(conditions=[RESERVED, ADMITTED], cluster_queue="gpus")])
    assert (run["phase"], run["restarts"]) == ("Restarting", 1) and calls.deleted == [RUN]


def test_the_workload_of_an_earlier_job_of_the_same_name_is_not_this_jobs():
    r, calls = reconciler()
    body, manifest = created_job(r, calls)
    old = workload(job_uid="job-0", conditions=[RESERVED, ADMITTED, EVICTED], evictions=[("Preempted", 1)])
    run = look(r, body, [job(manifest, uid="job-1")], [], [old])
    assert (run["phase"], run["restarts"]) == ("Queued", 0)


def test_cancel_deactivates_the_workload_so_kueue_does_not_start_the_job_again():
    r, calls = reconciler()
    body, manifest = created_job(r, calls)
    admitted = workload(conditions=[RESERVED, ADMITTED], cluster_queue="gpus")
    look(r, body, [job(manifest, suspended=False)], running_pods(), [admitted])
    body["metadata"]["annotations"] = {ANNOTATION_CANCEL: "2026-12-07T07:00:00Z"}
    run = look(r, body, [job(manifest, suspended=False)], running_pods(), [admitted])
    assert run["phase"] == "Cancelled"
    assert calls.deactivated == [admitted["name"]] and calls.suspended == [RUN]


def test_a_queued_run_on_a_cluster_without_kueue_fails_at_once_instead_of_waiting_forever():
    r, calls = reconciler(kueue_served=False)
    run = look(r, experiment_body())
    assert (run["phase"], run["reason"]) == ("Failed", "KueueNotInstalled")
    assert run["message"].startswith("spec.scheduling.queue: 'team'") and calls.created == []


def test_a_queued_run_waits_instead_of_failing_when_kueue_arrived_after_the_operator_started():
    r, calls = reconciler(kueue_served=False)
    calls.kueue_now_served = True  # the operator restarts itself to follow Workloads (operator/__main__.py)
    run = look(r, experiment_body())
    assert (run["phase"], run["reason"]) == ("Queued", "WaitingForKueue") and calls.created == []


def test_runs_without_a_queue_are_not_kueues():
    r, calls = reconciler()
    body = experiment_body(scheduling={"max_restarts": 1})
    look(r, body)
    (manifest,) = calls.created
    assert "suspend" not in manifest["spec"]["runPolicy"] and LABEL_QUEUE not in manifest["metadata"]["labels"]
    run = look(r, body, [job(manifest, suspended=False)], running_pods())
    assert run["phase"] == "Running" and "queue" not in run


def test_a_job_kueue_gave_its_namespaces_default_queue_is_followed_as_queued():
    r, calls = reconciler()
    body = experiment_body(scheduling={"max_restarts": 1})
    look(r, body)
    (manifest,) = calls.created
    defaulted = copy.deepcopy(manifest)
    defaulted["metadata"]["labels"][LABEL_QUEUE] = "default"  # what Kueue's webhook does where a "default" exists
    defaulted["spec"]["runPolicy"]["suspend"] = True
    run = look(r, body, [job(defaulted)], workloads=[workload(conditions=[NO_QUOTA])])
    assert (run["phase"], run["queue"]) == ("Queued", "default")


@pytest.mark.parametrize("queue", ["Team_A", "a" * 64, "-team"])
def test_a_queue_name_no_localqueue_and_no_label_can_have_is_refused_naming_the_field(queue):
    from dlmctl.spec import SpecError, experiment_from_dict

    body = experiment_body(scheduling={"queue": queue})
    with pytest.raises(SpecError, match=r"spec\.scheduling\.queue"):
        experiment_from_dict({k: body[k] for k in ("apiVersion", "kind", "spec")} | {"metadata": {"name": "exp"}})


# ---- on the real control plane, with the real Kueue ----------------------------------------------------------

SWEEP = {"arms": ["diffusion", "autoregressive"], "model": {"preset": "nano"},
         "data": {"unique_tokens": 8192, "seq_len": 64}, "metrics": {"port": 0},
         "batch": {"global_sequences": 64, "micro_batch_sequences": 4},
         "resources": {"nodes": 2, "gpus_per_node": 8},  # 16 GPUs a run: the 4 KWOK nodes hold two at once
         "checkpoint": {"uri": "s3://dlmctl-test/kueue"}, "sweep": {"data.epochs": [1, 2]}}


@pytest.fixture(scope="module")
def operator(cluster, s3_server, tmp_path_factory):
    from operator_harness import OperatorProcess, install_operator_rbac

    if not cluster.kueue_served():
        pytest.skip("the cluster runs no Kueue")
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(install_operator_rbac(cluster), log, env=s3_server.env()).start()
    yield process
    process.stop()
    print(f"operator log: {log}")


def spec_file(tmp_path, name: str, spec: dict):
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment",
                                    "metadata": {"name": name}, "spec": spec}))
    return path


@pytest.mark.cluster
def test_a_sweep_over_its_quota_starts_only_whole_runs_and_the_rest_wait_queued_until_quota_frees(
        cluster, cluster_namespace, kueue_queue, kube, operator, tmp_path, capsys):
    """Quota for one run (16 GPUs) where the nodes would hold two: Kueue, not the scheduler, decides, and no job
    ever has some of its pods placed while others wait for a node."""
    import time

    from cli_runs import run
    from operator_harness import Experiments

    queue = kueue_queue(gpus=16)
    spec = {**SWEEP, "scheduling": {"queue": queue}}
    assert run(capsys, "submit", spec_file(tmp_path, "sweep", spec), "-n", cluster_namespace)[0] == 0
    custom, core = kube
    experiments = Experiments(custom.api_client, cluster_namespace)
    runs = [f"sweep-{arm}-e{e}" for arm in ("dlm", "ar") for e in (1, 2)]
    finished, saw_queued, deadline = set(), set(), time.monotonic() + 240
    places_in_line = None  # the first look that saw three runs waiting, each with its place
    while len(finished) < 4:
        assert time.monotonic() < deadline, f"finished {sorted(finished)}; status {experiments.status('sweep')}"
        operator.check_alive()
        live = [p for p in core.list_namespaced_pod(cluster_namespace).items
                if p.status.phase in ("Pending", "Running") and not p.metadata.deletion_timestamp]
        by_run: dict[str, list] = {}
        for pod in live:
            by_run.setdefault(pod.metadata.labels["dlmctl.io/run"], []).append(pod)
        assert len(by_run) <= 1, f"two runs hold GPUs at once: {sorted(by_run)}"
        for name, pods in by_run.items():
            # placed whole: the scheduler binds an admitted job's pods one after the other (tens of ms apart),
            # but never leaves one of them unschedulable, holding its siblings' GPUs while it waits for a node
            unschedulable = [p.metadata.name for p in pods for c in p.status.conditions or []
                             if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"]
            assert not unschedulable, f"{name} partially placed: {unschedulable} wait for a node"
        statuses = experiments.runs("sweep")
        saw_queued |= {r for r, s in statuses.items() if s.get("phase") == "Queued"
                       and "insufficient unused quota" in (s.get("message") or "")}
        placed = {r: s["queue_position"] for r, s in statuses.items() if s.get("queue_position")}
        for name, place in placed.items():
            assert f"number {place} in line" in statuses[name]["message"], statuses[name]
        if places_in_line is None and len(placed) == 3:
            places_in_line = placed
            code, out, _ = run(capsys, "get", "sweep", "-n", cluster_namespace)
            assert code == 0 and f"{queue} #" in out, out
        for name, pods in by_run.items():
            if len(pods) == 2 and all(p.status.phase == "Running" for p in pods) \
                    and statuses.get(name, {}).get("phase") == "Running":
                for pod in pods:
                    cluster.mark_pod(pod.metadata.name, cluster_namespace, "Succeeded")
        finished = {r for r, s in statuses.items() if s.get("phase") == "Succeeded"}
        time.sleep(0.3)
    status = experiments.status("sweep")
    assert status["phase"] == "Succeeded" and sorted(r["name"] for r in status["runs"]) == sorted(runs)
    assert len(saw_queued) >= 2, f"runs seen waiting for quota: {saw_queued}"
    if cluster.kueue_visibility_served():  # one run holds the quota, the other three wait in line: places 1, 2, 3
        assert places_in_line and sorted(places_in_line.values()) == [1, 2, 3], places_in_line
    cluster_queue = cluster_namespace  # kueue_queue names the ClusterQueue after the namespace
    assert {(r["queue"], r.get("cluster_queue"), r["restarts"]) for r in status["runs"]} == {(queue, cluster_queue, 0)}
    code, out, err = run(capsys, "get", "sweep", "-n", cluster_namespace)
    assert code == 0, err
    header = next(line for line in out.splitlines() if " phase " in line)
    assert " queue " in header and f"{queue} ({cluster_queue})" in out


@pytest.mark.cluster
def test_cancel_stops_a_queued_run_for_good_kueue_does_not_start_it_again(
        cluster, cluster_namespace, kueue_queue, kube, operator, tmp_path, capsys):
    import time

    from cli_runs import run
    from operator_harness import Experiments, wait_until

    queue = kueue_queue(gpus=16)
    spec = {**{k: v for k, v in SWEEP.items() if k != "sweep"}, "arms": ["diffusion"], "scheduling": {"queue": queue}}
    assert run(capsys, "submit", spec_file(tmp_path, "stop", spec), "-n", cluster_namespace)[0] == 0
    custom, core = kube
    experiments = Experiments(custom.api_client, cluster_namespace)
    experiments.wait_run("stop", "stop-dlm", "Running", check=operator.check_alive)
    assert run(capsys, "cancel", "stop", "-n", cluster_namespace)[0] == 0
    experiments.wait_run("stop", "stop-dlm", "Cancelled", check=operator.check_alive)

    def workload():
        (found,) = custom.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", cluster_namespace,
                                                        "workloads")["items"]
        return found

    wait_until("the Workload deactivated", lambda: workload()["spec"].get("active") is False)
    live = lambda: [p.metadata.name for p in core.list_namespaced_pod(cluster_namespace).items
                    if p.status.phase in ("Pending", "Running") and not p.metadata.deletion_timestamp]
    wait_until("its pods gone", lambda: not live())
    until = time.monotonic() + 5  # Kueue reconciles a changed Workload at once: it had its chance to restart it
    while time.monotonic() < until:
        assert experiments.job("stop-dlm")["spec"]["runPolicy"]["suspend"] is True and not live()
        time.sleep(0.5)
    evicted = {c["type"]: c for c in workload()["status"]["conditions"]}["Evicted"]
    assert (evicted["status"], evicted["reason"]) == ("True", "Deactivated")


@pytest.mark.cluster
def test_a_queue_that_is_not_there_is_refused_at_submit_and_nothing_is_created_or_replaced(
        cluster, cluster_namespace, kube, tmp_path, capsys):
    from cli_runs import assert_user_error, run
    from kube_objects import experiments

    if not cluster.kueue_served():
        pytest.skip("the cluster runs no Kueue")
    custom, _ = kube
    unqueued = spec_file(tmp_path, "held", {k: v for k, v in SWEEP.items() if k != "sweep"})
    assert run(capsys, "submit", unqueued, "-n", cluster_namespace)[0] == 0
    queued = spec_file(tmp_path, "held", {**SWEEP, "scheduling": {"queue": "nowhere"}})
    code, _, err = run(capsys, "submit", queued, "-n", cluster_namespace, "--replace")
    assert_user_error(code, err, "spec.scheduling.queue", "no LocalQueue 'nowhere'", cluster_namespace)
    (kept,) = experiments(custom, cluster_namespace)
    assert "scheduling" not in kept["spec"] or not kept["spec"]["scheduling"].get("queue"), "the old one is kept"


@pytest.mark.cluster
def test_a_queue_on_a_cluster_without_kueue_is_refused_at_submit(tmp_path, capsys, monkeypatch):
    from cli_runs import assert_user_error, run
    from testenv.cluster import Cluster

    root = Path(__file__).resolve().parents[1]
    with Cluster.start(kueue=False, crds=sorted((root / "charts" / "dlmctl" / "crds").glob("*.yaml")),
                       workdir=tmp_path / "bare") as bare:
        assert not bare.kueue_served()
        monkeypatch.setenv("KUBECONFIG", str(bare.kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.delenv("DLMCTL_BACKEND", raising=False)
        code, _, err = run(capsys, "submit", spec_file(tmp_path, "q", {**SWEEP, "scheduling": {"queue": "team"}}),
                           "--backend", "kubernetes", "-n", "default")
        assert_user_error(code, err, "spec.scheduling.queue", "has no Kueue")
        from kubernetes import client

        with bare.api_client() as api:
            assert client.CustomObjectsApi(api).list_namespaced_custom_object(
                "dlmctl.io", "v1alpha1", "default", "experiments")["items"] == []
            # past the check (kubectl apply): the operator, which found no Kueue, fails the run rather than
            # leaving a suspended job nobody will ever admit
            from operator_harness import Experiments, OperatorProcess, install_operator_rbac, wait_until

            experiments = Experiments(api, "default")
            experiments.create("q", {**{k: v for k, v in SWEEP.items() if k != "sweep"}, "arms": ["diffusion"],
                                     "scheduling": {"queue": "team"}})
            operator = OperatorProcess(install_operator_rbac(bare), tmp_path / "operator.log").start()
            try:
                run_status = experiments.wait_run("q", "q-dlm", "Failed", check=operator.check_alive)
                assert run_status["reason"] == "KueueNotInstalled" and experiments.jobs("q") == []
                assert "Kueue not installed" in operator.log()

                # Kueue installed later (its Workload CRDs are what the operator looks for): the operator notices
                # and starts afresh in the same process, and from then on follows queued runs
                install_kueue_workload_crds(bare)
                wait_until("the operator restarted, following Workloads",
                           lambda: "Kueue found" in operator.log(), timeout=60, check=operator.check_alive)
                assert "Kueue installed: restarting" in operator.log()
                experiments.create("q2", {**{k: v for k, v in SWEEP.items() if k != "sweep"},
                                          "arms": ["diffusion"], "scheduling": {"queue": "team"}})
                queued = experiments.wait_run("q2", "q2-dlm", "Queued", check=operator.check_alive)
                (job,) = experiments.jobs("q2")  # suspended, waiting for a Kueue controller to admit it
                assert job["spec"]["runPolicy"]["suspend"] is True and job["metadata"]["labels"][LABEL_QUEUE] == "team"
                assert queued["reason"] == "WaitingForKueue"
                assert experiments.runs("q")["q-dlm"]["phase"] == "Failed"  # a finished run stays finished
            finally:
                operator.stop()


def install_kueue_workload_crds(cluster) -> None:
    """Kueue's Workload and WorkloadPriorityClass CRDs as upstream ships them, without the conversion webhook of
    a Kueue that is not running (objects stored in v1beta2 are read in v1beta2 without it)."""
    from testenv import buildenv
    from testenv.cluster import _yaml_docs

    crds = [crd for plural in ("workloads", "workloadpriorityclasses")
            for crd in _yaml_docs(buildenv.kueue_manifest_dir() / "crd" / "bases" / f"kueue.x-k8s.io_{plural}.yaml")]
    for crd in crds:
        crd["spec"].pop("conversion", None)
    cluster.install_crds(crds)


@pytest.mark.cluster
def test_the_readmes_queue_set_up_for_cluster_admins_is_what_kueue_accepts(cluster, cluster_namespace):
    """Every object of the README's minimal Kueue set-up, sent to the real API server and Kueue's webhooks."""
    import re

    import yaml
    from kubernetes import client

    if not cluster.kueue_served():
        pytest.skip("the cluster runs no Kueue")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "kind: ClusterQueue" in b]
    documents = list(yaml.safe_load_all(block))
    assert [d["kind"] for d in documents] == ["ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"]
    flavor, cluster_queue, local, priority = documents
    # the cluster's own objects may bear these names: the same objects, named for this test
    flavor["metadata"]["name"] = cluster_queue["spec"]["resourceGroups"][0]["flavors"][0]["name"] = f"{cluster_namespace}-f"
    cluster_queue["metadata"]["name"] = local["spec"]["clusterQueue"] = f"{cluster_namespace}-cq"
    priority["metadata"]["name"] = f"{cluster_namespace}-p"
    with cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        for doc in documents:
            group, version = doc["apiVersion"].split("/")
            plural = doc["kind"].lower() + ("es" if doc["kind"].endswith("s") else "s")
            if doc["kind"] == "LocalQueue":
                custom.create_namespaced_custom_object(group, version, cluster_namespace, plural,
                                                       {**doc, "metadata": {"name": doc["metadata"]["name"]}},
                                                       dry_run="All")
            else:
                custom.create_cluster_custom_object(group, version, plural, doc, dry_run="All")
