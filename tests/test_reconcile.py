"""The Reconciler's decisions, with the cluster calls recorded: what it creates is byte for byte what
`dlmctl render` prints (plus the owner reference), and restarts, backoff and cancel follow the spec."""
from __future__ import annotations

import copy

import kopf
import yaml

from dlmctl.cli.app import main
from dlmctl.spec.settings import OperatorSettings
from dlmctl.operator.jobs import ANNOTATION_CANCEL, ANNOTATION_RESTARTS
from dlmctl.operator.metrics import OperatorMetrics
from dlmctl.operator.observe import summarize_job, summarize_pod
from dlmctl.operator.reconcile import Reconciler

SPEC = {"arms": ["diffusion", "autoregressive"], "model": {"preset": "nano"},
        "data": {"unique_tokens": 8192, "seq_len": 64}, "checkpoint": {"uri": "s3://bucket/exp"},
        "scheduling": {"max_restarts": 1}, "sweep": {"data.epochs": [1, 2]}}


class RecordedJobs:
    def __init__(self):
        self.created, self.deleted, self.suspended = [], [], []

    def create(self, namespace, manifest):
        self.created.append(copy.deepcopy(manifest))
        return True

    def delete(self, namespace, name, uid):
        self.deleted.append(name)

    def suspend(self, namespace, name):
        self.suspended.append(name)


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


def experiment_body(**meta) -> dict:
    return {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": "exp", "namespace": "ns", "uid": "exp-uid", "generation": 1, **meta},
            "spec": copy.deepcopy(SPEC)}


def reconciler(clock=None):
    jobs = RecordedJobs()
    config = OperatorSettings(restart_backoff=10, restart_backoff_max=300, metrics_port=0, health_port=0)
    r = Reconciler(config, jobs, OperatorMetrics(), adopt=lambda child, owner: kopf.adopt(child, owner=owner),
                   progress=NoProgress(), clock=clock or Clock())
    return r, jobs


class NoProgress:
    def read(self, run):
        return None


def test_the_jobs_it_creates_are_what_render_prints(tmp_path, capsys):
    r, jobs = reconciler()
    status = r.reconcile(experiment_body(), [], [])
    spec_file = tmp_path / "exp.yaml"
    spec_file.write_text(yaml.safe_dump({"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment",
                                         "metadata": {"name": "exp", "namespace": "ns"}, "spec": SPEC}))
    assert main(["render", str(spec_file)]) == 0
    printed = capsys.readouterr().out
    sent = []
    for manifest in jobs.created:
        (owner,) = manifest["metadata"].pop("ownerReferences")
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("Experiment", "exp", "exp-uid", True)
        sent.append(manifest)
    assert yaml.safe_dump_all(sent, sort_keys=False, default_flow_style=False, width=120) == printed
    assert [r["phase"] for r in status["runs"]] == ["Pending"] * 4 and status["phase"] == "Pending"


def job_of(manifest: dict, uid: str, **status) -> dict:
    body = copy.deepcopy(manifest)
    body["metadata"]["uid"] = uid
    body["status"] = status
    return {**summarize_job(body), "run": body["metadata"]["name"]}


def failed_pod(run: str, job_uid: str, code: int) -> dict:
    return {**summarize_pod({
        "metadata": {"name": f"{run}-master-0", "ownerReferences": [{"uid": job_uid, "controller": True}]},
        "spec": {"nodeName": "n"},
        "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": code}}}]},
    }), "run": run}


def step(r, body, jobs, pods):
    """One reconcile, the status written back as the operator does (only when it changed)."""
    status = r.reconcile(body, jobs, pods)
    if status is not None:
        body["status"] = status
    return body["status"]


def test_a_failed_run_is_recreated_after_its_backoff_and_fails_past_max_restarts():
    clock = Clock()
    r, jobs = reconciler(clock)
    body = experiment_body()
    body["status"] = r.reconcile(body, [], [])
    manifest = next(m for m in jobs.created if m["metadata"]["name"] == "exp-dlm-e1")
    others = [job_of(m, f"uid-{m['metadata']['name']}") for m in jobs.created if m is not manifest]
    first = job_of(manifest, "uid-1")
    step(r, body, [first, *others], [failed_pod("exp-dlm-e1", "uid-1", 1)])
    run = next(x for x in body["status"]["runs"] if x["name"] == "exp-dlm-e1")
    assert (run["phase"], run["restarts"]) == ("Restarting", 1) and jobs.deleted == ["exp-dlm-e1"]
    assert "recreating in 10s" in run["message"]

    created = len(jobs.created)
    step(r, body, others, [])  # the job is gone, the backoff is not over
    assert len(jobs.created) == created
    clock.now += 10
    step(r, body, others, [])
    (recreated,) = jobs.created[created:]
    assert recreated["metadata"]["annotations"][ANNOTATION_RESTARTS] == "1"

    second = job_of(recreated, "uid-2")
    step(r, body, [second, *others], [failed_pod("exp-dlm-e1", "uid-2", 1)])
    run = next(x for x in body["status"]["runs"] if x["name"] == "exp-dlm-e1")
    assert (run["phase"], run["reason"], run["restarts"]) == ("Failed", "RestartLimitReached", 1)
    assert jobs.suspended == ["exp-dlm-e1"]
    assert body["status"]["phase"] == "Running", "the other runs go on"


def test_cancel_suspends_every_unfinished_run_and_keeps_finished_ones():
    r, jobs = reconciler()
    body = experiment_body()
    body["status"] = r.reconcile(body, [], [])
    live = [job_of(m, f"uid-{m['metadata']['name']}") for m in jobs.created]
    live[0] = job_of(jobs.created[0], "uid-done", conditions=[{"type": "Succeeded", "status": "True"}])
    step(r, body, live, [])
    body["metadata"]["annotations"] = {ANNOTATION_CANCEL: "2026-11-29T20:00:00Z"}
    status = r.reconcile(body, live, [])
    assert [x["phase"] for x in status["runs"]] == ["Succeeded", "Cancelled", "Cancelled", "Cancelled"]
    assert sorted(jobs.suspended) == sorted(m["metadata"]["name"] for m in jobs.created[1:])
    assert status["phase"] == "Cancelled"


def test_nothing_changed_means_no_status_write():
    r, _ = reconciler()
    body = experiment_body()
    body["status"] = r.reconcile(body, [], [])
    assert r.reconcile(body, [], []) is None
