"""Every Prometheus metric dlmctl exports, named once: the trainer, its checkpoint store, the operator and the
API service register theirs from here, and the Grafana dashboards (`operator/dashboards.py`) query these names.

A run's series carry `RUN_LABELS`. The sweep point's fields vary from one experiment to the next, so they
are not labels of every series: `point` holds the whole point as one stable string (`point_label`), and
the info metric `dlm_run_info` carries each field as a label of its own (`sweep_label`), to join on
`run` where a query needs one field. `namespace` is added by the scrape (PodMonitor/ServiceMonitor, or
the prometheus.io annotations' relabelling), never by the process.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from .experiment import Run


class Kind(str, Enum):
    counter = "counter"
    gauge = "gauge"
    histogram = "histogram"


@dataclass(frozen=True)
class Metric:
    """`name` as registered; a counter is exposed as `<name>_total`, a histogram as `<name>_bucket`,
    `_sum` and `_count` (prometheus_client's and OpenMetrics' convention)."""
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: Optional[tuple[float, ...]] = None

    @property
    def series(self) -> str:
        """The name a PromQL selector uses for the metric's value (histograms: their count)."""
        return {Kind.counter: f"{self.name}_total", Kind.gauge: self.name, Kind.histogram: f"{self.name}_count"}[self.kind]

    def bucket_series(self) -> str:
        assert self.kind is Kind.histogram, self.name
        return f"{self.name}_bucket"

    def sum_series(self) -> str:
        assert self.kind is Kind.histogram, self.name
        return f"{self.name}_sum"


RUN_LABELS = ("experiment", "run", "arm", "point")
STEP_PHASES = ("data", "forward_backward", "optimizer", "checkpoint_stall")  # one optimizer step, in order


def point_label(point: Mapping[str, Any]) -> str:
    """A sweep point as one label value, e.g. `data.unique_tokens=1000000,training.epochs=4` (`` for none)."""
    return ",".join(f"{k}={v}" for k, v in point.items())


def sweep_label(path: str) -> str:
    """The `dlm_run_info` label of a swept field: `data.unique_tokens` -> `sweep_data_unique_tokens`."""
    return "sweep_" + re.sub(r"[^a-zA-Z0-9_]", "_", path)


def run_labels(run: "Run") -> dict[str, str]:
    """The `RUN_LABELS` values of a run's series; the arm as the spec spells it (`diffusion`, `autoregressive`)."""
    return {"experiment": run.experiment, "run": run.name, "arm": run.arm.value, "point": point_label(run.point)}


def sweep_labels(point: Mapping[str, Any]) -> dict[str, str]:
    """The labels `dlm_run_info` adds for a sweep point: one `sweep_label(field)` per field, with its value."""
    return {sweep_label(k): f"{v}" for k, v in point.items()}


def register(metric: Metric, registry, extra_labels: tuple[str, ...] = ()):
    """The prometheus_client collector of `metric` in `registry`, with the catalogue's name, help, labels (plus
    `extra_labels`) and buckets. prometheus_client is imported here, when called: only the processes that
    export metrics need it."""
    import prometheus_client

    collector = {Kind.counter: prometheus_client.Counter, Kind.gauge: prometheus_client.Gauge,
                 Kind.histogram: prometheus_client.Histogram}[metric.kind]
    extra = {"buckets": metric.buckets} if metric.buckets else {}
    return collector(metric.name, metric.help, metric.labels + tuple(extra_labels), registry=registry, **extra)


def _m(name, kind, help, labels=RUN_LABELS, buckets=None) -> Metric:
    return Metric(name, Kind(kind), help, tuple(labels), buckets)


# --- a training run (rank 0 serves them on the port of spec.metrics.port) --------------------------------
RUN_INFO = _m("dlm_run_info", "gauge", "Always 1; labels: the run's sweep point, one sweep_<field> label per field")
TRAIN_STEPS = _m("dlm_train_steps", "counter", "Optimizer steps completed")
PLANNED_STEPS = _m("dlm_train_planned_steps", "gauge", "Optimizer steps the run will take in all")
TRAIN_TOKENS = _m("dlm_train_tokens", "counter", "Training tokens seen (repeats counted)")
EPOCH = _m("dlm_train_epoch", "gauge", "Passes over the run's unique training tokens so far")
PLANNED_EPOCHS = _m("dlm_train_planned_epochs", "gauge", "Passes over the unique tokens the run will make in all")
TRAIN_LOSS = _m("dlm_train_loss", "gauge", "Training loss of the last step (nats per token)")
LEARNING_RATE = _m("dlm_train_learning_rate", "gauge", "Learning rate of the last step")
TOKENS_PER_SECOND = _m("dlm_train_tokens_per_second", "gauge", "Training throughput over the last logging interval")
MFU = _m("dlm_train_mfu_ratio", "gauge", "Model FLOPs utilisation (0-1) over the last logging interval")
STEP_DURATION = _m("dlm_train_step_duration_seconds", "histogram", "Wall time of one optimizer step",
                   buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
STEP_PHASE_SECONDS = _m("dlm_train_step_phase_seconds", "counter",
                        "Wall time spent in each phase of the optimizer steps: " + ", ".join(STEP_PHASES),
                        labels=RUN_LABELS + ("phase",))
VALIDATION_LOSS = _m("dlm_validation_loss", "gauge",
                     "Validation loss, nats per token: AR's NLL, or the DLM's ELBO (an upper bound on its NLL)")
VALIDATION_LOSS_STDERR = _m("dlm_validation_loss_stderr", "gauge", "Standard error of dlm_validation_loss")
VALIDATION_TOKENS = _m("dlm_validation_tokens", "gauge", "Training tokens seen when dlm_validation_loss was measured")
CHOICE_ACCURACY = _m("dlm_choice_accuracy_ratio", "gauge", "Continuation-choice accuracy (0-1) at the last evaluation")

# --- its checkpoint store -----------------------------------------------------------------------------------
CHECKPOINT_SAVE_DURATION = _m(
    "dlm_checkpoint_save_duration_seconds", "histogram",
    "Upload lag: seconds from a checkpoint's commit to its manifest being written",
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
CHECKPOINT_STALL = _m("dlm_checkpoint_stall_seconds", "histogram",
                      "Seconds the training loop was blocked per checkpoint",
                      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
CHECKPOINT_UPLOAD_BYTES = _m("dlm_checkpoint_upload_bytes", "counter", "Checkpoint bytes uploaded")
CHECKPOINT_LAST_SUCCESS = _m("dlm_checkpoint_last_success_timestamp_seconds", "gauge",
                             "Unix time of the last checkpoint whose manifest was written (its age: time() - this)")
CHECKPOINT_RETRIES = _m("dlm_checkpoint_upload_retries", "counter", "Checkpoint store operations retried")
CHECKPOINT_FAILURES = _m("dlm_checkpoint_upload_failures", "counter", "Checkpoints that could not be saved")
CHECKPOINT_STAGED_BYTES = _m("dlm_checkpoint_staged_bytes", "gauge", "Bytes staged locally and not yet uploaded")
CHECKPOINT_UNREACHABLE_SINCE = _m("dlm_checkpoint_store_unreachable_since_timestamp_seconds", "gauge",
                                  "Unix time since which the checkpoint store has failed every request (0 while it answers)")

# --- the operator ---------------------------------------------------------------------------------------------
EXPERIMENT_LABELS = ("namespace", "experiment")
RECONCILE_DURATION = _m("dlm_operator_reconcile_duration_seconds", "histogram",
                        "Wall time of one reconcile of an experiment (its count: the reconcile rate)", labels=(),
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
RECONCILE_ERRORS = _m("dlm_operator_reconcile_errors", "counter", "Reconciles that raised", labels=())
JOBS_CREATED = _m("dlm_operator_jobs_created", "counter", "PyTorchJobs created for new runs", labels=())
JOBS_RECREATED = _m("dlm_operator_jobs_recreated", "counter",
                    "PyTorchJobs recreated after a preemption or a retryable failure", labels=())
RUNS_PREEMPTED = _m("dlm_operator_runs_preempted", "counter",
                    "Runs whose pods were evicted, preempted or lost with their node", labels=())
RUNS_FAILED = _m("dlm_operator_runs_failed", "counter", "Runs that failed for good", labels=())
RUNS = _m("dlm_operator_runs", "gauge", "Runs of each experiment by phase", labels=EXPERIMENT_LABELS + ("phase",))
RUN_RESTARTS = _m("dlm_operator_run_restarts", "gauge", "Times the operator restarted each run (preemptions included)",
                  labels=EXPERIMENT_LABELS + ("run", "arm", "point"))
GPUS_REQUESTED = _m("dlm_operator_gpus_requested", "gauge", "GPUs the experiment's unfinished runs ask for",
                    labels=EXPERIMENT_LABELS)
GPUS_ALLOCATED = _m("dlm_operator_gpus_allocated", "gauge", "GPUs held by the experiment's pods bound to a node",
                    labels=EXPERIMENT_LABELS)
CROSSOVER_TOKENS = _m("dlm_experiment_crossover_tokens", "gauge",
                      "Training tokens at the crossover compare finds for a sweep point: the first evaluation after "
                      "which the DLM's validation loss stays below AR's best so far (NaN: none yet)",
                      labels=EXPERIMENT_LABELS + ("point",))
CROSSOVER_EPOCHS = _m("dlm_experiment_crossover_epochs", "gauge", "Epochs at that crossover (NaN: none yet)",
                      labels=EXPERIMENT_LABELS + ("point",))

# --- the API service ------------------------------------------------------------------------------------------
SERVICE_REQUESTS = _m("dlm_service_requests", "counter", "HTTP requests answered, by route template and status",
                      labels=("method", "route", "status"))
SERVICE_REQUEST_DURATION = _m("dlm_service_request_duration_seconds", "histogram",
                              "Wall time to answer an HTTP request (streamed logs: until the answer starts)",
                              labels=("method", "route"),
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

TRAINER_METRICS = (RUN_INFO, TRAIN_STEPS, PLANNED_STEPS, TRAIN_TOKENS, EPOCH, PLANNED_EPOCHS, TRAIN_LOSS,
                   LEARNING_RATE, TOKENS_PER_SECOND, MFU, STEP_DURATION, STEP_PHASE_SECONDS, VALIDATION_LOSS,
                   VALIDATION_LOSS_STDERR, VALIDATION_TOKENS, CHOICE_ACCURACY)
CHECKPOINT_METRICS = (CHECKPOINT_SAVE_DURATION, CHECKPOINT_STALL, CHECKPOINT_UPLOAD_BYTES, CHECKPOINT_LAST_SUCCESS,
                      CHECKPOINT_RETRIES, CHECKPOINT_FAILURES, CHECKPOINT_STAGED_BYTES, CHECKPOINT_UNREACHABLE_SINCE)
OPERATOR_METRICS = (RECONCILE_DURATION, RECONCILE_ERRORS, JOBS_CREATED, JOBS_RECREATED, RUNS_PREEMPTED, RUNS_FAILED,
                    RUNS, RUN_RESTARTS, GPUS_REQUESTED, GPUS_ALLOCATED, CROSSOVER_TOKENS, CROSSOVER_EPOCHS)
SERVICE_METRICS = (SERVICE_REQUESTS, SERVICE_REQUEST_DURATION)
ALL_METRICS = TRAINER_METRICS + CHECKPOINT_METRICS + OPERATOR_METRICS + SERVICE_METRICS
