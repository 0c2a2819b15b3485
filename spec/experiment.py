"""The Experiment custom resource: what users write, what the operator watches, what runs are made of."""
from __future__ import annotations

import copy
import itertools
import math
import re
from datetime import datetime
from typing import Annotated, Any, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .base import SpecModel, Strict
from .contracts import DataPhase, ExperimentPhase, RunPhase, RunProgress
from .model import ModelSpec
from .sections import (
    Arm,
    BatchSpec,
    CheckpointSpec,
    DataSpec,
    DeepSpeedSpec,
    EvalSpec,
    MetricsSpec,
    ObjectiveSpec,
    OptimizerSpec,
    ResourcesSpec,
    ScheduleSpec,
    SchedulingSpec,
)

GROUP = "dlmctl.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Experiment"
PLURAL = "experiments"

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# The training-operator names a Service after each replica (`<run>-worker-<i>`); it must stay a DNS label.
REPLICA_SUFFIX = "-worker-"
MAX_LABEL = 63
NAME_RULE = "lowercase letters, digits and '-', starting and ending alphanumeric"
UNSWEEPABLE = ("arms", "sweep", "max_runs")
# The largest integer every JSON reader keeps exactly. The API server holds schema bounds as float64 and
# refuses an integer bound it cannot read back as an int64 (2**63 - 1 is 2**63 as a float64).
MAX_SEED = 2**53 - 1
MAX_SWEEP_FIELDS = 16
MAX_SWEEP_VALUES = 64
DEFAULT_MAX_RUNS = 1000
MAX_RUNS_LIMIT = 100_000  # expanding a run costs about 0.1 ms: 10 s for `validate`, and a machine's worth of processes
SWEEP_KEYS = ("a sweep key is the dotted path of a field of the spec, e.g. data.epochs (arms and sweep cannot be swept, "
              "nor max_runs)")
TOO_MANY_RUNS = "more than spec.max_runs ({max_runs}); narrow the sweep or raise spec.max_runs"
DISTINCT_ARMS = "each arm may be listed once"
IMMUTABLE_SPEC = "spec is immutable: runs cannot change once submitted; resubmit with `dlmctl submit --replace`"
# Label keys and values as Kubernetes accepts them (a run's labels are copied onto its PyTorchJob and pods).
LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{LABEL_NAME}$")
LABEL_VALUE = re.compile(rf"^({LABEL_NAME})?$")
MAX_LABEL_PREFIX = 253
LABEL_KEY_RULE = ("[PREFIX/]NAME: NAME at most 63 letters, digits, '-', '_' and '.', starting and ending alphanumeric; "
                  "PREFIX a DNS subdomain of at most 253 characters")
# Choice-task rules: each example is cut from context_tokens + continuation_tokens of validation text (one
# sequence for the model), and every example and every choice needs a window of its own.
CHOICE_FITS_SEQUENCE = "eval.choice_task: context_tokens + continuation_tokens must be <= data.seq_len"
CHOICE_WINDOWS = "eval.choice_task.examples: the validation set must hold one window of context_tokens + " \
    "continuation_tokens for each example and each choice"
# What the API server and controllers write into an object's metadata. An Experiment read back from the
# cluster (`kubectl get experiment X -o yaml`) carries them; they mean nothing to the spec and are dropped.
SERVER_SET_METADATA = (
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
    "managedFields", "finalizers", "ownerReferences", "selfLink", "generateName",
)


class Metadata(Strict):
    name: str = Field(min_length=1, max_length=MAX_LABEL)
    namespace: Optional[str] = Field(default=None, max_length=MAX_LABEL)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _drop_server_set(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in SERVER_SET_METADATA}
        return data

    @field_validator("labels", "annotations")
    @classmethod
    def _label_keys(cls, v, info):
        for key, value in v.items():
            prefix, _, name = key.rpartition("/")
            if not LABEL_KEY.match(key) or len(name) > MAX_LABEL or len(prefix) > MAX_LABEL_PREFIX:
                raise ValueError(f"{_short(key)!r} is not a valid {info.field_name[:-1]} key ({LABEL_KEY_RULE})")
            if info.field_name == "labels" and (len(value) > MAX_LABEL or not LABEL_VALUE.match(value)):
                raise ValueError(
                    f"{_short(key)}: {_short(value)!r} is not a valid label value (at most {MAX_LABEL} letters, digits, "
                    "'-', '_' and '.', starting and ending alphanumeric, or empty)")
        return v

    @field_validator("name", "namespace")
    @classmethod
    def _dns_label(cls, v):
        if v is not None and not DNS_1123_LABEL.match(v):
            raise ValueError(
                f"{v!r} is not a valid Kubernetes name ({NAME_RULE})"
            )
        return v


class ExperimentSpec(SpecModel):
    arms: list[Arm] = Field(default_factory=lambda: [Arm.diffusion, Arm.autoregressive], min_length=1, max_length=len(Arm))
    seed: int = Field(default=1234, ge=0, le=MAX_SEED)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    precision: Literal["bf16", "fp32"] = "fp32"
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    sweep: dict[str, Annotated[list[Any], Field(min_length=1, max_length=MAX_SWEEP_VALUES)]] = Field(
        default_factory=dict,
        max_length=MAX_SWEEP_FIELDS,
        description="grid over spec fields by dotted path, e.g. data.unique_tokens: [1e6, 1e7]; expands into runs",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    max_runs: int = Field(
        default=DEFAULT_MAX_RUNS, ge=1, le=MAX_RUNS_LIMIT,
        description="the most runs (arms x sweep points) the experiment may expand into: a guard against a sweep "
        "far larger than meant; raise it for a bigger study",
    )

    @field_validator("arms")
    @classmethod
    def _distinct_arms(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(DISTINCT_ARMS)
        return v

    @model_validator(mode="after")
    def _batch_fits_world(self):
        seqs = self.batch.sequences(self.data.seq_len)
        per_step = self.batch.micro_batch_sequences * self.resources.world_size
        if seqs % per_step:
            raise ValueError(
                f"batch: global batch of {seqs} sequences is not divisible by micro_batch_sequences "
                f"({self.batch.micro_batch_sequences}) x world size ({self.resources.world_size})"
            )
        return self

    @model_validator(mode="after")
    def _choice_task_fits(self):
        task, data = self.eval.choice_task, self.data
        if task.examples == 0:
            return self
        if task.window > data.seq_len:
            raise ValueError(
                f"eval.choice_task: context_tokens + continuation_tokens ({task.context_tokens} + "
                f"{task.continuation_tokens}) must be <= data.seq_len ({data.seq_len})")
        needed, windows = max(task.examples, task.choices), data.validation_tokens // task.window
        if windows < needed:
            raise ValueError(
                f"eval.choice_task.examples: {task.examples} examples of {task.window} tokens with {task.choices} "
                f"choices need {needed} windows, but data.validation_tokens ({data.validation_tokens}) holds "
                f"{windows}; raise data.validation_tokens or lower the examples")
        return self

    @property
    def run_count(self) -> int:
        """Runs the spec expands into (arms x sweep points), counted without expanding them."""
        return len(self.arms) * math.prod(len(values) for values in self.sweep.values())

    @property
    def global_batch_sequences(self) -> int:
        return self.batch.sequences(self.data.seq_len)

    @property
    def grad_accumulation(self) -> int:
        return self.accumulation(self.resources.world_size)

    def accumulation(self, world_size: int) -> int:
        """Micro-steps per optimizer step on `world_size` processes (a resumed run may have another)."""
        return self.global_batch_sequences // (self.batch.micro_batch_sequences * world_size)

    @property
    def total_steps(self) -> int:
        """Optimizer steps to see `epochs` passes over the unique sequences."""
        return max(1, math.ceil(self.data.epochs * self.data.unique_sequences / self.global_batch_sequences))


def _leaf_paths(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaf_paths(field.annotation, f"{prefix}{name}.")
        elif f"{prefix}{name}" not in UNSWEEPABLE:
            yield f"{prefix}{name}"


# Every field of the spec that holds a value (not a section), by dotted path: the keys a sweep may use.
SWEEPABLE: tuple[str, ...] = tuple(_leaf_paths(ExperimentSpec))


class RunStatus(Strict):
    name: str
    arm: Arm
    phase: RunPhase = RunPhase.Pending
    reason: Optional[str] = Field(default=None, description="a CamelCase word saying why the run is in its phase")
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    tokens: int = 0
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    choice_accuracy: Optional[float] = Field(default=None, description="continuation-choice accuracy (0-1)")
    unigram_entropy: Optional[float] = Field(
        default=None, description="nats per token of the training tokens' unigram distribution: the loss of a "
        "model that learnt only token frequencies",
    )
    val_loss_stderr: Optional[float] = Field(default=None, description="standard error of val_loss (DLM ELBO)")
    last_checkpoint: Optional[str] = Field(default=None, description="the newest verified checkpoint")
    restarts: int = Field(default=0, description="times the run was recreated after a preemption or failure, or "
                          "preempted by Kueue and admitted again")
    queue: Optional[str] = Field(default=None, description="the Kueue LocalQueue its job waits in")
    cluster_queue: Optional[str] = Field(default=None, description="the Kueue ClusterQueue that admitted it")
    queue_position: Optional[int] = Field(
        default=None, ge=1, description="while Queued: its place in line in its ClusterQueue (1 is admitted next), "
        "as Kueue's visibility API reports it")
    message: Optional[str] = None
    startTime: Optional[datetime] = None
    completionTime: Optional[datetime] = None


# What a run's metrics say that its status shows: the fields the two models share, derived, never listed.
PROGRESS_STATUS_FIELDS = frozenset(RunProgress.model_fields) & frozenset(RunStatus.model_fields)


def status_progress(progress: RunProgress) -> dict[str, Any]:
    """The RunStatus fields a run's metrics give (those it has a value for)."""
    return {k: v for k, v in progress.model_dump(include=PROGRESS_STATUS_FIELDS).items() if v is not None}


class Condition(Strict):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: Optional[str] = None
    message: Optional[str] = None
    lastTransitionTime: Optional[datetime] = None


class DataPreparationStatus(Strict):
    name: str = Field(description="the data-preparation Job")
    phase: DataPhase = DataPhase.Pending
    reason: Optional[str] = Field(default=None, description="a CamelCase word saying why it is in its phase")
    message: Optional[str] = None
    workers: int = Field(default=1, description="its pods (completion indexes)")
    completed: int = Field(default=0, description="pods that finished their shards")
    runs: list[str] = Field(default_factory=list, description="the runs that wait for it")
    startTime: Optional[datetime] = None
    completionTime: Optional[datetime] = None


class ExperimentStatus(Strict):
    phase: ExperimentPhase = ExperimentPhase.Pending
    observedGeneration: Optional[int] = None
    runs: list[RunStatus] = Field(default_factory=list)
    data: list[DataPreparationStatus] = Field(
        default_factory=list, description="data preparations (one per source the runs read through an s3:// cache)")
    conditions: list[Condition] = Field(default_factory=list)
    progress: Optional[str] = Field(default=None, description="succeeded/total runs, e.g. 3/4 (a kubectl get column)")
    startTime: Optional[datetime] = None
    completionTime: Optional[datetime] = None


class Run(Strict):
    """One concrete training run: an arm at one sweep point, with the sweep applied to its spec."""

    name: str
    experiment: str
    namespace: Optional[str] = None
    arm: Arm
    point: dict[str, Any] = Field(default_factory=dict)
    spec: ExperimentSpec


class Experiment(Strict):
    # A spec file must say what it is (load.py checks that it does); objects built in code may leave both out.
    model_config = ConfigDict(json_schema_extra={"required": ["apiVersion", "kind", "metadata"]})

    apiVersion: Literal["dlmctl.io/v1alpha1"] = API_VERSION
    kind: Literal["Experiment"] = KIND
    metadata: Metadata
    spec: ExperimentSpec = Field(default_factory=ExperimentSpec)
    status: Optional[ExperimentStatus] = None

    @model_validator(mode="after")
    def _runs_expand(self):
        for _ in self.iter_runs():  # every sweep point must be a valid spec with a valid, unique run name
            pass
        return self

    def runs(self) -> list[Run]:
        return list(self.iter_runs())

    def iter_runs(self) -> Iterator[Run]:
        """The runs one at a time, in a fixed order; the sweep's keys and size are checked before the first."""
        _check_sweep_keys(self.spec.sweep)
        count, limit = self.spec.run_count, self.spec.max_runs
        if count > limit:
            raise ValueError(
                f"spec.sweep: expands into {count} runs ({len(self.spec.arms)} arms x {count // len(self.spec.arms)} "
                f"sweep points), {TOO_MANY_RUNS.format(max_runs=limit)}")
        seen = set()
        for point in _points(self.spec.sweep):
            spec = _apply(self.spec, point)
            for arm in self.spec.arms:
                name = run_name(self.metadata.name, arm, point)
                if name in seen:
                    raise ValueError(f"spec.sweep: two runs would both be named {name!r}")
                _check_run_name(name, spec.resources.world_size)
                seen.add(name)
                yield Run(name=name, experiment=self.metadata.name, namespace=self.metadata.namespace,
                          arm=arm, point=point, spec=spec)


def _check_sweep_keys(sweep: dict[str, list[Any]]) -> None:
    for path, values in sweep.items():
        if path.split(".")[0] in UNSWEEPABLE:
            raise ValueError(f"spec.sweep.{path}: {path.split('.')[0]} cannot be swept")
        if path not in SWEEPABLE:
            raise ValueError(f"spec.sweep.{path}: not a field of the spec; {SWEEP_KEYS}")
        if not values:
            raise ValueError(f"spec.sweep.{path}: needs at least one value")
        if len({repr(v) for v in values}) != len(values):
            raise ValueError(f"spec.sweep.{path}: values must be distinct")


def _points(sweep: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    keys = list(sweep)
    return (dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys)))


def _apply(spec: ExperimentSpec, point: dict[str, Any]) -> ExperimentSpec:
    if not point:
        return spec.model_copy(update={"sweep": {}})
    tree = spec.model_dump(mode="json", exclude={"sweep"}, exclude_none=True)
    if spec.data.total_tokens is not None and "data.epochs" not in point:
        del tree["data"]["epochs"]  # derived from total_tokens, again at this point's unique_tokens
    for path, value in point.items():
        node = tree
        *sections, leaf = path.split(".")
        for part in sections:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"spec.sweep.{path}: {part!r} is not a section of the spec")
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    try:
        return ExperimentSpec.model_validate(tree)
    except Exception as err:  # re-raised with the sweep point named, see errors.py
        raise SweepPointError(point, err) from None


class SweepPointError(ValueError):
    def __init__(self, point: dict[str, Any], cause: Exception):
        self.point, self.cause = point, cause
        super().__init__(f"sweep point {point}: {cause}")


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _check_run_name(name: str, world_size: int) -> None:
    longest = len(name) + len(REPLICA_SUFFIX) + len(str(max(world_size - 1, 0)))
    if not DNS_1123_LABEL.match(name) or longest > MAX_LABEL:
        raise ValueError(
            f"metadata.name: run name {name!r} is too long: with the replica suffix it has {longest} characters "
            f"(Kubernetes allows {MAX_LABEL}); shorten metadata.name"
        )


def run_name(experiment: str, arm: Arm, point: dict[str, Any]) -> str:
    """`<experiment>-<dlm|ar>[-<key><value>...]`, e.g. `scarce-dlm-ut100m-e40`."""
    abbrevs = _abbreviations(list(point))
    parts = [experiment, arm.short] + [f"{abbrevs[k]}{_slug(v)}" for k, v in point.items()]
    return "-".join(parts)


def _abbreviations(paths: list[str]) -> dict[str, str]:
    def initials(path: str) -> str:
        return "".join(w[0] for w in path.split(".")[-1].split("_") if w)

    short = {p: initials(p) for p in paths}
    if len(set(short.values())) != len(short):
        short = {p: re.sub(r"[^a-z0-9]", "", p.split(".")[-1].lower()) for p in paths}
    if len(set(short.values())) != len(short):
        short = {p: re.sub(r"[^a-z0-9]", "", p.lower()) for p in paths}
    return short


def _slug(value: Any) -> str:
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (int, float)) and float(value).is_integer() and abs(value) >= 1000:
        n = int(value)
        for unit, size in (("t", 10**12), ("g", 10**9), ("m", 10**6), ("k", 10**3)):
            if n % size == 0:
                return f"{n // size}{unit}".replace("-", "n")
        return str(n).replace("-", "n")
    text = str(value).lower().replace(".", "p").replace("-", "n").replace("+", "")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "x"
