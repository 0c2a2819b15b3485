"""The operator's Prometheus metrics (`dlm_operator_*`), served on /metrics."""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server


class OperatorMetrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        r = self.registry = registry or CollectorRegistry()
        self.jobs_created = Counter("dlm_operator_jobs_created", "PyTorchJobs created for new runs", registry=r)
        self.jobs_recreated = Counter("dlm_operator_jobs_recreated",
                                      "PyTorchJobs recreated after a preemption or a retryable failure", registry=r)
        self.runs_preempted = Counter("dlm_operator_runs_preempted",
                                      "Runs whose pods were evicted, preempted or lost with their node", registry=r)
        self.runs_failed = Counter("dlm_operator_runs_failed", "Runs that failed for good", registry=r)
        self.reconcile_errors = Counter("dlm_operator_reconcile_errors", "Reconciles that raised", registry=r)
        self.reconcile_seconds = Histogram(
            "dlm_operator_reconcile_duration_seconds", "Wall time of one reconcile of an experiment", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        if port:
            start_http_server(port, addr=addr, registry=self.registry)
