"""The Kubernetes objects an Experiment becomes: one kubeflow.org/v1 PyTorchJob per run.

`dlmctl render` prints them (through `render.job_manifests`) and the operator creates them, so what a
user reviews is exactly what a cluster receives. Restarts belong to the dlmctl operator, not to the
training-operator: a job's pods never restart in place (`restartPolicy: Never`, no `backoffLimit`: the
training-operator counts only in-place restarts against it, so a limit of 0 would fail every job at once);
the operator decides from why a run stopped whether to recreate its job (it resumes from its newest
verified checkpoint) or to fail it.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any

import yaml
from kubeflow.training import models as k
from kubeflow.training.api_client import ApiClient

from dlmctl.spec import Experiment, Run, SpecError
from dlmctl.spec.contracts import RUN_SPEC_ENV

from .kueue import queue_labels
from .observe import GPU_RESOURCE

JOB_GROUP, JOB_VERSION, JOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_API_VERSION = f"{JOB_GROUP}/{JOB_VERSION}"
JOB_KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the training-operator's default container name for PyTorchJob
RENDEZVOUS_PORT = 23456  # the training-operator reads MASTER_PORT from this named port
OUTPUT_DIR = "/workspace/output"
LABEL_EXPERIMENT = "dlmctl.io/experiment"
LABEL_RUN = "dlmctl.io/run"
LABEL_ARM = "dlmctl.io/arm"
ANNOTATION_RESTARTS = "dlmctl.io/restarts"  # on a recreated job: how many times its run was recreated
ANNOTATION_CANCEL = "dlmctl.io/cancel-requested"  # on an Experiment: `dlmctl cancel` (an RFC 3339 time)
ANNOTATION_DISRUPTED = "dlmctl.io/disrupted"  # on a job: "<reason>: <message>" of a pod taken away

# The training-operator injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, MASTER_ADDR and
# MASTER_PORT into every replica; the kubelet expands $(VAR) in the command from the container env.
TORCHRUN = [
    "torchrun",
    "--nnodes=$(PET_NNODES)",
    "--nproc-per-node=$(PET_NPROC_PER_NODE)",
    "--node-rank=$(PET_NODE_RANK)",
    "--master-addr=$(MASTER_ADDR)",
    "--master-port=$(MASTER_PORT)",
]


def check_cluster_ready(experiment: Experiment) -> None:
    """What a cluster run needs beyond a valid spec: pods have no durable disk, so checkpoints and
    metrics must go to S3 (that is also where `get`, `compare`, `sample` and `export` read them)."""
    uri = experiment.spec.checkpoint.uri
    if not (uri or "").startswith("s3://"):
        raise SpecError(
            f"spec.checkpoint.uri: a cluster run needs an s3:// URI (got {uri or 'none'}); pods have no durable "
            "disk, and checkpoints and metrics are read back from there"
        )


def pytorch_jobs(experiment: Experiment, workload_priority_classes: frozenset[str] = frozenset()
                 ) -> list[k.KubeflowOrgV1PyTorchJob]:
    check_cluster_ready(experiment)
    return [pytorch_job(run, experiment.metadata.labels, workload_priority_classes) for run in experiment.runs()]


def pytorch_job(run: Run, extra_labels: dict[str, str] | None = None,
                workload_priority_classes: frozenset[str] = frozenset()) -> k.KubeflowOrgV1PyTorchJob:
    """`workload_priority_classes`: the cluster's Kueue WorkloadPriorityClasses (the operator knows them; `render`,
    offline, assumes none)."""
    res = run.spec.resources
    labels = {**(extra_labels or {}), LABEL_EXPERIMENT: run.experiment, LABEL_RUN: run.name, LABEL_ARM: run.arm.value}
    template = _pod_template(run, labels)
    replicas = {"Master": _new(k.KubeflowOrgV1ReplicaSpec, replicas=1, restart_policy="Never", template=template)}
    if res.nodes > 1:
        replicas["Worker"] = _new(k.KubeflowOrgV1ReplicaSpec, replicas=res.nodes - 1, restart_policy="Never",
                                  template=template)
    queued = queue_labels(run, workload_priority_classes)
    return _new(
        k.KubeflowOrgV1PyTorchJob,
        api_version=JOB_API_VERSION,
        kind=JOB_KIND,
        metadata=_new(k.V1ObjectMeta, name=run.name, namespace=run.namespace, labels={**labels, **queued}),
        spec=_new(
            k.KubeflowOrgV1PyTorchJobSpec,
            nproc_per_node=str(res.procs_per_node),
            pytorch_replica_specs=replicas,
            # queued: created suspended, so no pod exists before Kueue admits the whole job
            run_policy=_new(k.KubeflowOrgV1RunPolicy, clean_pod_policy="None", suspend=True if queued else None),
        ),
    )


def job_gpus(run: Run) -> int:
    """The GPUs a run's job asks for: one pod per node (its Master and Workers), each requesting
    `gpus_per_node` (see `_pod_template`)."""
    return run.spec.resources.nodes * run.spec.resources.gpus_per_node


def threads_per_process(run: Run) -> int:
    """CPU threads of each trainer process in a pod: the pod's CPUs (its limit, equal to its request)
    shared by its processes, at least 1."""
    from kubernetes.utils import parse_quantity

    res = run.spec.resources
    return max(1, int(parse_quantity(res.cpu_request) // res.procs_per_node))


def thread_env(run: Run) -> list[k.V1EnvVar]:
    """OpenMP/MKL threads per process, waiting passively: threads that spin-wait on cores another process
    needs burn several times the CPU of the work itself."""
    return threads_env(threads_per_process(run))


def threads_env(threads: int) -> list[k.V1EnvVar]:
    return [_new(k.V1EnvVar, name=name, value=value)
            for name, value in (("OMP_NUM_THREADS", str(threads)), ("MKL_NUM_THREADS", str(threads)),
                                ("OMP_WAIT_POLICY", "PASSIVE"))]


def credentials_env_from(run: Run) -> list[k.V1EnvFromSource] | None:
    """The S3 credentials Secret, referenced, never copied into a job."""
    name = run.spec.checkpoint.credentials_secret
    return [_new(k.V1EnvFromSource, secret_ref=_new(k.V1SecretEnvSource, name=name))] if name else None


def _pod_template(run: Run, labels: dict[str, str]) -> k.V1PodTemplateSpec:
    spec, res = run.spec, run.spec.resources
    annotations = None
    ports = [_new(k.V1ContainerPort, name="pytorchjob-port", container_port=RENDEZVOUS_PORT)]
    if spec.metrics.port:
        annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(spec.metrics.port),
            "prometheus.io/path": "/metrics",
        }
        ports.append(_new(k.V1ContainerPort, name="metrics", container_port=spec.metrics.port))
    quantities = {"cpu": res.cpu_request, "memory": res.memory_request}
    if res.gpus_per_node:
        quantities[GPU_RESOURCE] = str(res.gpus_per_node)
    volumes = [_new(k.V1Volume, name="output", empty_dir=_new(k.V1EmptyDirVolumeSource))]
    mounts = [_new(k.V1VolumeMount, name="output", mount_path=OUTPUT_DIR)]
    if res.gpus_per_node:  # NCCL and data-loader workers need more than the default 64 MiB /dev/shm
        volumes.append(_new(k.V1Volume, name="dshm", empty_dir=_new(k.V1EmptyDirVolumeSource, medium="Memory")))
        mounts.append(_new(k.V1VolumeMount, name="dshm", mount_path="/dev/shm"))
    container = _new(
        k.V1Container,
        name=CONTAINER,
        image=res.image,
        command=[*TORCHRUN, "-m", "dlmctl.trainer", "--output", OUTPUT_DIR],
        env=[_new(k.V1EnvVar, name=RUN_SPEC_ENV, value=run.model_dump_json()), *thread_env(run)],
        env_from=credentials_env_from(run),
        ports=ports,
        resources=_new(k.V1ResourceRequirements, requests=dict(quantities), limits=dict(quantities)),
        volume_mounts=mounts,
    )
    return _new(
        k.V1PodTemplateSpec,
        metadata=_new(k.V1ObjectMeta, labels=dict(labels), annotations=annotations),
        spec=_new(
            k.V1PodSpec,
            containers=[container],
            volumes=volumes,
            priority_class_name=spec.scheduling.priority_class,
        ),
    )


def _new(model: type, **fields: Any) -> Any:
    """A client model that shares its library's one Configuration: each model builds a Configuration of its
    own otherwise (17 per job, most of the time rendering a large sweep took)."""
    return model(local_vars_configuration=_configuration(model), **fields)


def _configuration(model: type) -> Any:
    return _library_configuration(model.__module__.split(".")[0])


@functools.cache
def _library_configuration(library: str) -> Any:
    return importlib.import_module({"kubernetes": "kubernetes.client", "kubeflow": "kubeflow.training"}[library]).Configuration()


def to_dicts(objects: list[Any]) -> list[dict]:
    client = ApiClient()
    return [client.sanitize_for_serialization(obj) for obj in objects]


def to_yaml(documents: list[dict]) -> str:
    # libyaml's emitter when PyYAML has it: the same bytes, ~7x faster (most of rendering a big sweep)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml.dump_all(documents, Dumper=dumper, sort_keys=False, default_flow_style=False, width=120)

