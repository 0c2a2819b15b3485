"""Everything an Experiment becomes on a cluster, in the order the operator creates it: its data-preparation
Jobs, then one PyTorchJob per run. `dlmctl render` prints exactly this."""
from __future__ import annotations

from dlmctl.spec import Experiment

from .data_jobs import data_preparation_jobs
from .jobs import pytorch_jobs, to_dicts, to_yaml


def job_manifests(experiment: Experiment, workload_priority_classes: frozenset[str] = frozenset()) -> list[dict]:
    """The objects as plain JSON-ready dicts, exactly as `dlmctl render` prints them (which knows no cluster, so
    names no Kueue WorkloadPriorityClass: see `kueue.queue_labels`)."""
    training = pytorch_jobs(experiment, workload_priority_classes)  # checks the experiment can run on a cluster first
    return to_dicts([*data_preparation_jobs(experiment), *training])


def render_yaml(experiment: Experiment) -> str:
    return to_yaml(job_manifests(experiment))
