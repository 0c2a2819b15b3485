"""Data preparation on a cluster: one Kubernetes Indexed Job per token cache an Experiment's runs read.

A run whose `spec.data.cache` is an s3:// prefix reads its tokens from there. Rather than every pod of
every run tokenizing the source, the operator first creates one Indexed Job per distinct preparation
(`DataSpec.preparation_identity`: same sources, validation size, tokenizer and cache, so the sweep points
of a unique-token sweep share it): pod i of `spec.data.preparation.workers` runs
`python -m dlmctl.trainer prepare-data`, which builds the cache's plan (pod 0) and the shards j with
j mod workers = i, and the last one to finish writes the entry's manifest. The runs' PyTorchJobs are
created once it has succeeded. `dlmctl render` prints these Jobs before the PyTorchJobs.

Failures are Kubernetes' to count: a pod that exits 2 (`USER_ERROR_EXIT`: a user's mistake, e.g. the source is not there)
fails the whole Job at once (`podFailurePolicy`); a pod taken away (`DisruptionTarget`) is replaced
without counting; anything else is retried up to `BACKOFF_PER_INDEX` times per index.
"""
from __future__ import annotations

from collections import defaultdict

from kubernetes.client import models as b
from kubernetes.utils import parse_quantity

from dlmctl.spec import Experiment, Run
from dlmctl.spec.contracts import RUN_SPEC_ENV, DataPhase
from dlmctl.spec.settings import DATA_WORKERS_ENV

from .jobs import LABEL_EXPERIMENT, _new, credentials_env_from, threads_env
from .observe import USER_ERROR_EXIT, job_conditions

LABEL_DATA = "dlmctl.io/data"  # on a data-preparation Job and its pods: the preparation's identity
CONTAINER = "prepare"
BACKOFF_PER_INDEX = 3
# An Indexed Job's pods are named after it with their index (<job>-<index>-<random>) and their hostname is
# <job>-<index>: a DNS label of at most 63 characters, with up to 4 digits of index.
MAX_NAME = 63 - len("-1023")


def prepares_data(run: Run) -> bool:
    """Only an s3:// cache can be shared by the pods of a cluster; without one each pod prepares its own."""
    return (run.spec.data.cache or "").startswith("s3://")


def data_job_name(run: Run) -> str:
    suffix = f"-data-{run.spec.data.preparation_identity}"
    return run.experiment[: MAX_NAME - len(suffix)].rstrip("-.") + suffix


def preparations(runs: list[Run]) -> dict[str, list[Run]]:
    """The data-preparation Jobs a set of runs needs, by name, each with the runs that wait for it (in the
    runs' order)."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if prepares_data(run):
            groups[data_job_name(run)].append(run)
    return dict(groups)


def data_preparation_jobs(experiment: Experiment) -> list[b.V1Job]:
    return [data_preparation_job(runs[0], experiment.metadata.labels)
            for runs in preparations(experiment.runs()).values()]


def data_preparation_job(run: Run, extra_labels: dict[str, str] | None = None) -> b.V1Job:
    """The Indexed Job that prepares `run`'s token cache (the same Job for every run sharing it: which run
    it is built from changes nothing it does, since the budget, epochs, sequence length and packing only
    choose what a run reads)."""
    prep, identity = run.spec.data.preparation, run.spec.data.preparation_identity
    labels = {**(extra_labels or {}), LABEL_EXPERIMENT: run.experiment, LABEL_DATA: identity}
    quantities = {"cpu": prep.cpu, "memory": prep.memory}
    threads = max(1, int(parse_quantity(prep.cpu)))
    container = _new(
        b.V1Container,
        name=CONTAINER,
        image=run.spec.resources.image,
        command=["python", "-m", "dlmctl.trainer", "prepare-data"],
        env=[
            _new(b.V1EnvVar, name=RUN_SPEC_ENV, value=run.model_dump_json()),
            _new(b.V1EnvVar, name=DATA_WORKERS_ENV, value=str(prep.workers)),
            _new(b.V1EnvVar, name="RAYON_NUM_THREADS", value=str(threads)),  # the tokenizer's thread pool
            *threads_env(threads),
        ],
        env_from=credentials_env_from(run),
        resources=_new(b.V1ResourceRequirements, requests=dict(quantities), limits=dict(quantities)),
    )
    failure_policy = _new(b.V1PodFailurePolicy, rules=[
        _new(b.V1PodFailurePolicyRule, action="FailJob", on_exit_codes=_new(
            b.V1PodFailurePolicyOnExitCodesRequirement, container_name=CONTAINER, operator="In",
            values=[USER_ERROR_EXIT])),
        _new(b.V1PodFailurePolicyRule, action="Ignore", on_pod_conditions=[_new(
            b.V1PodFailurePolicyOnPodConditionsPattern, type="DisruptionTarget", status="True")]),
    ])
    return _new(
        b.V1Job,
        api_version="batch/v1",
        kind="Job",
        metadata=_new(b.V1ObjectMeta, name=data_job_name(run), namespace=run.namespace, labels=labels),
        spec=_new(
            b.V1JobSpec,
            completion_mode="Indexed",
            completions=prep.workers,
            parallelism=prep.workers,
            backoff_limit_per_index=BACKOFF_PER_INDEX,
            pod_failure_policy=failure_policy,
            template=_new(
                b.V1PodTemplateSpec,
                metadata=_new(b.V1ObjectMeta, labels=dict(labels)),
                spec=_new(b.V1PodSpec, containers=[container], restart_policy="Never",
                          priority_class_name=run.spec.scheduling.priority_class),
            ),
        ),
    )


# ---- what a data-preparation Job says -----------------------------------------------------------


def summarize_data_job(body: dict) -> dict:
    """The few fields of a batch/v1 Job the operator needs (kept in its in-memory index)."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status", {}) or {}
    conditions = job_conditions(status)
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
        "identity": (meta.get("labels") or {}).get(LABEL_DATA),
        "deleting": bool(meta.get("deletionTimestamp")),
        "suspended": bool(spec.get("suspend")),
        "completions": int(spec.get("completions") or 1),
        "succeeded": int(status.get("succeeded") or 0),
        "active": int(status.get("active") or 0),
        "conditions": conditions,
    }


def data_phase(job: dict) -> tuple[DataPhase, str, str]:
    """(phase, reason, message) of a data preparation from its Job's summary."""
    conditions, done = job["conditions"], f"{job['succeeded']}/{job['completions']} pods done"
    if conditions.get("Complete", (None,))[0] == "True":
        return DataPhase.Succeeded, "Complete", f"the token cache is ready ({done})"
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed and failed[0] == "True":
        return (DataPhase.Failed, failed[1] or "JobFailed",
                f"{failed[2] or 'the job failed'}; its pods' logs say why: "
                f"kubectl logs -n {job['namespace']} -l {LABEL_DATA}={job['identity']} --prefix")
    if job["suspended"]:
        return DataPhase.Pending, "Suspended", f"the job is suspended ({done})"
    if job["active"] or job["succeeded"]:
        return DataPhase.Running, "Preparing", f"tokenizing the source into the cache ({done})"
    return DataPhase.Pending, "Pending", f"waiting for its pods ({done})"
