"""The operator's per-experiment series, from a Reconciler driven as in test_reconcile: runs by phase as
its statuses say, restarts as it counted them, GPUs asked for by the unfinished runs' pods (as `render`
builds them) and held by the pods bound to a node, the crossover of each sweep point as spec.crossover
finds it; and nothing left of an experiment once it is forgotten."""
from __future__ import annotations

import copy
import math
from collections import Counter

import kopf
import pytest
from prometheus_client import CollectorRegistry

from dlmctl.spec.settings import OperatorSettings
from dlmctl.operator.metrics import OperatorMetrics
from dlmctl.operator.observe import summarize_pod
from dlmctl.operator.reconcile import Reconciler
from dlmctl.spec.contracts import EvalEvent, RunPhase, RunProgress
from dlmctl.spec.crossover import find_crossover
from test_reconcile import SPEC, Clock, RecordedJobs, job_of, step

GPU_SPEC = {**copy.deepcopy(SPEC), "resources": {"nodes": 2, "gpus_per_node": 4},
            "batch": {"global_sequences": 64, "micro_batch_sequences": 8}}
RUNNING = {"conditions": [{"type": "Running", "status": "True"}]}
SUCCEEDED = {"conditions": [{"type": "Succeeded", "status": "True"}]}


class Progress:
    """Each run's evaluations, as a ProgressReader would have folded them from its metrics.jsonl."""

    def __init__(self, evals: dict[str, list[EvalEvent]] | None = None):
        self.evals = evals or {}

    def read(self, run):
        return RunProgress(evals=self.evals.get(run.name, []))


def reconciler(progress=None):
    registry, jobs = CollectorRegistry(), RecordedJobs()
    config = OperatorSettings(restart_backoff=10, restart_backoff_max=300, metrics_port=0, health_port=0)
    r = Reconciler(config, jobs, OperatorMetrics(registry), adopt=lambda child, owner: kopf.adopt(child, owner=owner),
                   progress=progress or Progress(), clock=Clock())
    return r, jobs, registry


def body(name="exp", uid="exp-uid") -> dict:
    return {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": name, "namespace": "ns", "uid": uid, "generation": 1}, "spec": copy.deepcopy(GPU_SPEC)}


def pods_of(manifest: dict, job_uid: str, *placements: tuple[str, str | None]) -> list[dict]:
    """The job's pods as the cluster makes them from its replicas' template, each (phase, node)."""
    template = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    run = manifest["metadata"]["name"]
    return [{**summarize_pod({
        "metadata": {"name": f"{run}-{i}", "ownerReferences": [{"uid": job_uid, "controller": True}]},
        "spec": {**template["spec"], "nodeName": node},
        "status": {"phase": phase, "containerStatuses": [
            {"state": {"terminated": {"exitCode": 1}} if phase == "Failed" else {"running": {}}}]},
    }), "run": run} for i, (phase, node) in enumerate(placements)]


def requested_gpus(manifest: dict) -> int:
    """What a job asks for: its replicas times their containers' GPU requests."""
    return sum(spec.get("replicas", 1) * int(c["resources"]["requests"].get("nvidia.com/gpu", 0))
               for spec in manifest["spec"]["pytorchReplicaSpecs"].values()
               for c in spec["template"]["spec"]["containers"])


def series(registry, name: str) -> dict[tuple, float]:
    """{label values (sorted by label name): value} of every sample named `name`."""
    return {tuple(v for _, v in sorted(s.labels.items())): s.value
            for family in registry.collect() for s in family.samples if s.name == name}


def of_experiment(registry, experiment: str) -> list:
    return [s for family in registry.collect() for s in family.samples if s.labels.get("experiment") == experiment]


def test_runs_by_phase_restarts_and_gpus_follow_the_statuses_and_the_pods():
    r, jobs, registry = reconciler()
    exp = body()
    step(r, exp, [], [])
    manifests = {m["metadata"]["name"]: m for m in jobs.created}
    runs = list(manifests)
    assert series(registry, "dlm_operator_runs") == {
        ("exp", "ns", p.value): (4 if p is RunPhase.Pending else 0) for p in RunPhase}
    assert series(registry, "dlm_operator_gpus_requested") == {("exp", "ns"): 4 * 2 * 4}
    assert series(registry, "dlm_operator_gpus_allocated") == {("exp", "ns"): 0}

    done, running, placed, failing = runs
    live = {name: job_of(manifests[name], f"uid-{name}", **(SUCCEEDED if name == done else RUNNING)) for name in runs}
    pods = (pods_of(manifests[running], f"uid-{running}", ("Running", "n1"), ("Running", "n2"))
            + pods_of(manifests[placed], f"uid-{placed}", ("Pending", "n3"), ("Pending", None))
            + pods_of(manifests[failing], f"uid-{failing}", ("Failed", "n4"), ("Running", "n5")))
    status = step(r, exp, list(live.values()), pods)

    phases = Counter(run["phase"] for run in status["runs"])
    assert phases == {"Succeeded": 1, "Running": 1, "Pending": 1, "Restarting": 1}
    assert series(registry, "dlm_operator_runs") == {("exp", "ns", p.value): phases[p.value] for p in RunPhase}
    unfinished = [run["name"] for run in status["runs"] if not RunPhase(run["phase"]).terminal]
    assert series(registry, "dlm_operator_gpus_requested") == {
        ("exp", "ns"): sum(requested_gpus(manifests[name]) for name in unfinished)}
    bound = [p for p in pods if p["node"] and p["phase"] not in ("Succeeded", "Failed")]
    assert len(bound) == 4
    assert series(registry, "dlm_operator_gpus_allocated") == {("exp", "ns"): 4 * len(bound)}
    point = {"exp-dlm-e1": "data.epochs=1", "exp-ar-e1": "data.epochs=1", "exp-dlm-e2": "data.epochs=2",
             "exp-ar-e2": "data.epochs=2"}
    arm = {run["name"]: run["arm"] for run in status["runs"]}
    assert series(registry, "dlm_operator_run_restarts") == {
        (arm[run["name"]], "exp", "ns", point[run["name"]], run["name"]): run.get("restarts", 0)
        for run in status["runs"]}
    assert series(registry, "dlm_operator_run_restarts")[(arm[failing], "exp", "ns", point[failing], failing)] == 1


def evals(*points: tuple[int, float]) -> list[EvalEvent]:
    """Evaluations every 1000 tokens of a pool of 4000 unique tokens: (step, validation loss)."""
    return [EvalEvent(event="eval", time=0.0, step=s, total_steps=40, epoch=s * 1000 / 4000, tokens=s * 1000,
                      val_loss=loss) for s, loss in points]


def test_the_crossover_gauges_are_what_find_crossover_says_nan_while_there_is_none():
    curves = {
        "exp-ar-e1": evals((4, 5.0), (8, 4.0), (12, 3.8), (16, 3.9), (20, 4.1)),  # overfits
        "exp-dlm-e1": evals((4, 6.0), (8, 4.5), (12, 3.9), (16, 3.7), (20, 3.5)),  # overtakes at step 16
        "exp-ar-e2": evals((4, 5.0), (8, 4.0)),
        "exp-dlm-e2": evals((4, 6.0), (8, 5.0)),  # behind so far
    }
    r, jobs, registry = reconciler(Progress(curves))
    exp = body()
    step(r, exp, [], [])
    live = [job_of(m, f"uid-{m['metadata']['name']}", **RUNNING) for m in jobs.created]
    pods = [p for m in jobs.created
            for p in pods_of(m, f"uid-{m['metadata']['name']}", ("Running", "a"), ("Running", "b"))]
    status = step(r, exp, live, pods)
    assert {run["phase"] for run in status["runs"]} == {"Running"}

    expected = find_crossover(curves["exp-dlm-e1"], curves["exp-ar-e1"])
    assert (expected.step, expected.tokens) == (16, 16000)
    assert find_crossover(curves["exp-dlm-e2"], curves["exp-ar-e2"]) is None
    tokens = series(registry, "dlm_experiment_crossover_tokens")
    epochs = series(registry, "dlm_experiment_crossover_epochs")
    assert set(tokens) == set(epochs) == {("exp", "ns", "data.epochs=1"), ("exp", "ns", "data.epochs=2")}
    assert tokens[("exp", "ns", "data.epochs=1")] == expected.tokens
    assert epochs[("exp", "ns", "data.epochs=1")] == expected.epoch == 4.0
    assert math.isnan(tokens[("exp", "ns", "data.epochs=2")]) and math.isnan(epochs[("exp", "ns", "data.epochs=2")])


def test_a_forgotten_experiment_leaves_no_series_and_others_keep_theirs():
    r, _, registry = reconciler()
    kept, gone = body("kept", "kept-uid"), body("gone", "gone-uid")
    step(r, kept, [], [])
    step(r, gone, [], [])
    before = of_experiment(registry, "kept")
    assert of_experiment(registry, "gone") and before
    r.forget("gone-uid")
    assert of_experiment(registry, "gone") == []
    assert of_experiment(registry, "kept") == before


def test_an_experiment_that_becomes_invalid_keeps_only_its_counts():
    r, _, registry = reconciler()
    exp = body()
    step(r, exp, [], [])
    assert series(registry, "dlm_operator_run_restarts") and series(registry, "dlm_experiment_crossover_tokens")
    exp["spec"]["resources"]["gpus_per_node"] = 3  # 64 sequences no longer divide over the processes
    exp["metadata"]["generation"] = 2
    assert step(r, exp, [], [])["phase"] == "Invalid"
    assert series(registry, "dlm_operator_run_restarts") == {}
    assert series(registry, "dlm_experiment_crossover_tokens") == {}
    assert set(series(registry, "dlm_operator_runs").values()) == {0}
    assert series(registry, "dlm_operator_gpus_requested") == {("exp", "ns"): 0}


@pytest.mark.parametrize("name", ["dlm_operator_jobs_created_total", "dlm_operator_reconcile_duration_seconds_count"])
def test_the_counters_are_from_the_catalogue(name):
    r, _, registry = reconciler()
    step(r, body(), [], [])
    assert registry.get_sample_value(name) >= 1
