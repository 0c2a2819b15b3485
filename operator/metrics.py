"""The operator's Prometheus metrics (`spec.metrics.OPERATOR_METRICS`), served on /metrics: counters of
what it did, and per experiment its runs by phase, their restarts, the GPUs they ask for and hold, and
the crossover of each sweep point (`spec.crossover`)."""
from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Iterable, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry, start_http_server

from dlmctl.spec import Run
from dlmctl.spec.contracts import EvalEvent, RunPhase
from dlmctl.spec.crossover import find_crossover
from dlmctl.spec.metrics import (
    CROSSOVER_EPOCHS, CROSSOVER_TOKENS, GPUS_ALLOCATED, GPUS_REQUESTED, JOBS_CREATED, JOBS_RECREATED,
    OPERATOR_METRICS, RECONCILE_DURATION, RECONCILE_ERRORS, RUN_RESTARTS, RUNS, RUNS_FAILED, RUNS_PREEMPTED, Metric,
    register, run_labels,
)
from dlmctl.spec.sections import Arm

from .jobs import job_gpus

# An experiment's series: {metric: {label values in the metric's label order: value}}.
Series = dict[Metric, dict[tuple[str, ...], float]]
FINISHED_POD_PHASES = ("Succeeded", "Failed")


class OperatorMetrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        r = self.registry = registry or CollectorRegistry()
        self._collectors = {m: register(m, r) for m in OPERATOR_METRICS}
        self.jobs_created = self._collectors[JOBS_CREATED]
        self.jobs_recreated = self._collectors[JOBS_RECREATED]
        self.runs_preempted = self._collectors[RUNS_PREEMPTED]
        self.runs_failed = self._collectors[RUNS_FAILED]
        self.reconcile_errors = self._collectors[RECONCILE_ERRORS]
        self.reconcile_seconds = self._collectors[RECONCILE_DURATION]
        self._shown: dict[str, set[tuple[Metric, tuple[str, ...]]]] = {}  # experiment uid -> its series
        self._lock = threading.Lock()  # experiments are reconciled on several threads

    def show(self, uid: str, series: Series) -> None:
        """Set the series of the experiment `uid` to `series`; those it had and no longer has are removed."""
        with self._lock:
            shown = set()
            for metric, values in series.items():
                for labels, value in values.items():
                    self._collectors[metric].labels(*labels).set(value)
                    shown.add((metric, labels))
            for metric, labels in self._shown.get(uid, set()) - shown:
                self._collectors[metric].remove(*labels)
            self._shown[uid] = shown

    def forget(self, uid: str) -> None:
        """The experiment is gone: none of its series stays."""
        self.show(uid, {})
        with self._lock:
            self._shown.pop(uid, None)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        if port:
            start_http_server(port, addr=addr, registry=self.registry)


def experiment_series(namespace: str, experiment: str, runs: Sequence[Run], statuses: Sequence[Mapping],
                      pods: Iterable[Mapping], evals: Mapping[str, Sequence[EvalEvent]]) -> Series:
    """An experiment's series: `runs` with their `statuses` (the same order), its pods' summaries
    (observe.summarize_pod) and each run's evaluations so far, by run name."""
    phases = Counter(s["phase"] for s in statuses)
    series: Series = {
        RUNS: {(namespace, experiment, p.value): phases[p.value] for p in RunPhase},
        RUN_RESTARTS: {}, CROSSOVER_TOKENS: {}, CROSSOVER_EPOCHS: {},
        GPUS_REQUESTED: {(namespace, experiment): sum(
            job_gpus(run) for run, s in zip(runs, statuses) if not RunPhase(s["phase"]).terminal)},
        GPUS_ALLOCATED: {(namespace, experiment): sum(
            p.get("gpus", 0) for p in pods if p.get("node") and p.get("phase") not in FINISHED_POD_PHASES)},
    }
    arms: dict[str, dict[Arm, Run]] = {}
    for run, s in zip(runs, statuses):
        labels = run_labels(run)
        series[RUN_RESTARTS][(namespace, experiment, run.name, labels["arm"], labels["point"])] = s.get("restarts") or 0
        arms.setdefault(labels["point"], {})[run.arm] = run
    for point, both in arms.items():
        if len(both) < 2:
            continue
        found = find_crossover(evals.get(both[Arm.diffusion].name, ()), evals.get(both[Arm.autoregressive].name, ()))
        series[CROSSOVER_TOKENS][(namespace, experiment, point)] = found.tokens if found else math.nan
        series[CROSSOVER_EPOCHS][(namespace, experiment, point)] = found.epoch if found else math.nan
    return series

