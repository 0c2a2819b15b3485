"""The sections of `spec`: data, objectives, optimisation, resources, checkpoints, eval, metrics."""
from __future__ import annotations

import hashlib
import json
import math
import re
from enum import Enum
from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import SpecModel
from .redact import redact_text
from .uris import ENDPOINT_CHECKS, LOCATION_CHECKS, MAX_URI_LENGTH, URI_SCHEMES, first_failure

BUILTIN_CORPORA = ("python-stdlib",)

# Rules the models check beyond single fields. The CRD's CEL rules (spec/crd.py) say the same words.
TOKENIZER_PATH_REQUIRED = "path: required when kind is 'file'"
TOKENIZER_PATH_FORBIDDEN = "path: only allowed when kind is 'file'"
SCHEDULE_PHASES_FIT = "warmup_fraction + decay_fraction must be <= 1"
ONE_BATCH_SIZE = "set global_sequences or global_tokens, not both"
VOCAB_SIZE_NOT_BYTE = ("vocab_size: not allowed when kind is 'byte' (a byte tokenizer has 256 byte tokens and its "
                       "special tokens)")
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_GLOBAL_SEQUENCES = 32  # when neither batch.global_sequences nor batch.global_tokens is set

# A pod's CPU and memory when the spec does not say: a share per GPU that leaves headroom on a typical
# 8-GPU node (8 x 10 CPUs = 80 of 96 cores, 8 x 100Gi = 800Gi of 1Ti), or a small CPU-only pod.
CPU_PER_GPU = 10
MEMORY_GI_PER_GPU = 100
CPU_WITHOUT_GPUS = 4
MEMORY_GI_WITHOUT_GPUS = 16


# Kubernetes quantities and names, as the API server (and the kubelet) will check them. RE2 syntax, ASCII classes.
POSITIVE_NUMBER = r"([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)"
CPU_PATTERN = rf"^{POSITIVE_NUMBER}m?$"
MEMORY_PATTERN = rf"^{POSITIVE_NUMBER}(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# An image reference, [REGISTRY[:PORT]/]REPOSITORY[:TAG][@DIGEST], as container runtimes parse it.
_HOST_PART = r"[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?"
_PATH_PART = r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*"
# The first part is a registry only when it looks like a host: it has a '.' or a port, or is localhost.
_REGISTRY = rf"((localhost|{_HOST_PART}(\.{_HOST_PART})+)(:[0-9]+)?|{_HOST_PART}:[0-9]+)"
IMAGE_PATTERN = (
    rf"^({_REGISTRY}/)?{_PATH_PART}(/{_PATH_PART})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)


def package_version() -> Optional[str]:
    """dlmctl's version from the installed package's metadata; None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dlmctl")
    except PackageNotFoundError:
        return None


# The one image (Dockerfile) that runs the trainer, the operator and the service, tagged with the package version.
# The Helm chart's default image (charts/dlmctl: image.repository, appVersion) names the same (tests/test_chart.py).
IMAGE_REPOSITORY = "ghcr.io/dlmctl/dlmctl"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{package_version() or 'latest'}"


def _check_location(value: Optional[str]) -> Optional[str]:
    if value is not None:
        failed = first_failure(value, LOCATION_CHECKS)
        if failed is not None:
            raise ValueError(f"{_shown(value)!r}: {failed.message}" if failed.echo else failed.message)
    return value


def _shown(value: str, limit: int = 120) -> str:
    """A value as an error message may show it: secrets masked, cut to `limit` characters."""
    value = redact_text(value)
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _matching(pattern: str, message: str):
    """A before-validator refusing strings that do not match `pattern` with `message` (the field's `pattern`
    says the same to the API server, in its own words)."""

    def check(value):
        if isinstance(value, str) and not re.search(pattern, value):
            raise ValueError(message.format(value=_shown(value)))
        return value

    return check


class Arm(str, Enum):
    diffusion = "diffusion"
    autoregressive = "autoregressive"

    @property
    def short(self) -> str:
        return {"diffusion": "dlm", "autoregressive": "ar"}[self.value]


def _check_source(value: str) -> str:
    if value.startswith("builtin:"):
        name = value.removeprefix("builtin:")
        if name not in BUILTIN_CORPORA:
            raise ValueError(f"unknown built-in corpus {_shown(name)!r}; choose one of {', '.join(BUILTIN_CORPORA)}")
        return value
    _check_location(value)
    if not value.startswith(URI_SCHEMES) and not re.match(r"^[\w.-]+(/[\w.-]*)*$", value):
        raise ValueError(f"{_shown(value)!r} is not a local path, s3:// URI or builtin:<corpus>")
    return value


class TokenizerSpec(SpecModel):
    kind: Literal["bpe", "byte", "file"] = Field(
        default="bpe",
        description="bpe: byte-level BPE trained on the training source (the same for every sweep point); "
                    "byte: raw bytes; file: tokenizer.json",
    )
    vocab_size: int = Field(default=DEFAULT_VOCAB_SIZE, ge=260, le=1_048_576,
                            description="BPE vocabulary size (kind: bpe)")
    training_bytes: int = Field(
        default=8 << 20, ge=1024, le=256 << 20,
        description="kind: bpe: the BPE is trained on the first this many bytes of the training source (in its "
                    "fixed document order), whatever `unique_tokens` is, so one experiment's sweep points share "
                    "one tokenizer and their per-token losses compare",
    )
    path: Optional[str] = Field(default=None, max_length=MAX_URI_LENGTH,
                                description="tokenizer.json (a local file or an s3:// URI), for kind: file")

    _path = field_validator("path")(_check_location)

    @model_validator(mode="after")
    def _path_iff_file(self):
        if self.kind == "file" and not self.path:
            raise ValueError(TOKENIZER_PATH_REQUIRED)
        if self.kind != "file" and self.path:
            raise ValueError(TOKENIZER_PATH_FORBIDDEN)
        if self.kind == "byte" and self.vocab_size != DEFAULT_VOCAB_SIZE:  # the default is no choice of the user
            raise ValueError(VOCAB_SIZE_NOT_BYTE)
        return self


class DataPreparationSpec(SpecModel):
    """How a cluster prepares the token cache: a Kubernetes Indexed Job run before the training jobs when
    `spec.data.cache` is an s3:// prefix. Locally the same shards are built in the trainer's process."""

    workers: int = Field(
        default=1, ge=1, le=1024,
        description="pods of the data-preparation Indexed Job (its completions and parallelism); pod i tokenizes "
                    "the shards j with j mod workers = i",
    )
    shard_bytes: int = Field(
        default=64 << 20, ge=1 << 10, le=1 << 40,
        description="text per shard (about; a shard holds whole documents): the unit of work a pod takes and the "
                    "most text one holds in memory at once",
    )
    cpu: str = Field(default="4", pattern=CPU_PATTERN, description="CPU request (and limit) of each preparation pod")
    memory: str = Field(default="8Gi", pattern=MEMORY_PATTERN,
                        description="memory request (and limit) of each preparation pod")

    _cpu = field_validator("cpu", mode="before")(_matching(
        CPU_PATTERN, "{value!r} is not a positive CPU quantity, e.g. 8, 0.5 or 500m"))
    _memory = field_validator("memory", mode="before")(_matching(
        MEMORY_PATTERN, "{value!r} is not a positive memory quantity, e.g. 16Gi, 512Mi or 2G"))


class DataSpec(SpecModel):
    train: str = Field(
        default="builtin:python-stdlib", max_length=MAX_URI_LENGTH,
        description="training text: a local file or folder, an s3:// URI, or builtin:python-stdlib",
    )
    validation: Optional[str] = Field(
        default=None, max_length=MAX_URI_LENGTH,
        description="validation text; when unset, held-out documents of the training source",
    )
    validation_tokens: int = Field(default=65536, ge=1, le=10**10, description="size of the validation set")
    unique_tokens: int = Field(
        default=1_000_000, ge=1, le=10**13, description="unique training tokens, repeated for `epochs` passes"
    )
    epochs: float = Field(default=4, gt=0, le=100_000, description="passes over the unique tokens (may be fractional)")
    total_tokens: Optional[int] = Field(
        default=None, ge=1, le=10**15,
        description="training tokens in all, instead of `epochs`: epochs = total_tokens / unique_tokens, so a sweep "
                    "over unique_tokens keeps the compute fixed (the data-constrained studies' design)",
    )
    seq_len: int = Field(default=256, ge=8, le=1_048_576, description="tokens per training sequence")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    cache: Optional[str] = Field(
        default=None, max_length=MAX_URI_LENGTH,
        description="token cache: a local dir or an s3:// prefix; on a cluster an s3:// cache is prepared once, by "
                    "an Indexed Job before the training jobs, for every run that reads the same source",
    )
    packing: Literal["fixed", "per-epoch"] = Field(
        default="fixed",
        description="fixed: the unique pool is cut into seq_len windows once and the windows are permuted each "
                    "epoch; per-epoch: as Megatron, the pool's documents are reshuffled and re-packed into windows "
                    "every epoch (keyed by seed and epoch), so window boundaries change between epochs",
    )
    preparation: DataPreparationSpec = Field(default_factory=DataPreparationSpec)

    _source = field_validator("train", "validation")(lambda v: v if v is None else _check_source(v))
    _cache = field_validator("cache")(_check_location)

    @model_validator(mode="before")
    @classmethod
    def _epochs_from_total_tokens(cls, data):
        if not isinstance(data, dict) or data.get("total_tokens") is None:
            return data
        try:
            epochs = float(data["total_tokens"]) / float(data.get("unique_tokens", cls.model_fields["unique_tokens"].default))
        except (TypeError, ValueError, ZeroDivisionError):
            return data  # the fields' own checks name the bad value
        if data.get("epochs") is not None:
            try:
                given = float(data["epochs"])
            except (TypeError, ValueError):
                return data
            if not math.isclose(given, epochs, rel_tol=1e-9):
                raise ValueError(f"epochs: {data['epochs']} disagrees with total_tokens / unique_tokens = {epochs:g}; "
                                 "set one of epochs and total_tokens")
        return {**data, "epochs": epochs}

    @model_validator(mode="after")
    def _at_least_one_sequence(self):
        for name in ("unique_tokens", "validation_tokens"):
            if getattr(self, name) < self.seq_len:
                raise ValueError(f"{name}: {getattr(self, name)} is less than one sequence (seq_len={self.seq_len})")
        return self

    @property
    def unique_sequences(self) -> int:
        return self.unique_tokens // self.seq_len

    @property
    def preparation_identity(self) -> str:
        """A short hash of what one data preparation produces: the token cache entry's inputs (sources,
        validation size, tokenizer, where it is cached) and how it is prepared, but not the budget, epochs,
        sequence length or packing, which only choose what a run reads from it. Runs with the same identity
        share one preparation."""
        fields = self.model_dump(mode="json", include={"train", "validation", "validation_tokens", "tokenizer",
                                                        "cache", "preparation"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


class DiffusionSpec(SpecModel):
    mask_schedule: Literal["linear"] = Field(
        default="linear",
        description="mask probability as a function of t: linear p=t, the schedule for which dividing by p(t) is the ELBO",
    )
    eps: float = Field(default=0.0, ge=0, lt=1, description="t ~ U(eps, 1); 0 as MegaDLMs, 1e-3 as SMDM/LLaDA")
    loss_weight: Literal["realized", "sampled"] = Field(
        default="realized", description="divide each row's masked CE by its realized mask ratio or by p(t)"
    )
    antithetic: bool = Field(default=False, description="stratify t across the global batch")
    random_length_fraction: float = Field(
        default=0.0, ge=0, le=1,
        description="fraction of training sequences cut to a length drawn from U[1, seq_len], each keyed by its "
                    "sample index (MegaDLMs' --difflm-varilen-prob, 0.01 there)",
    )

    @model_validator(mode="after")
    def _sampled_weight_needs_eps(self):
        if self.loss_weight == "sampled" and self.eps == 0:
            raise ValueError(
                "loss_weight: 'sampled' needs eps > 0 (1e-3 as SMDM/LLaDA): with t near 0 the one masked token "
                "divided by p(t) has an infinite expected loss"
            )
        return self


class AutoregressiveSpec(SpecModel):
    input_mask_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of input tokens replaced by [MASK] (targets untouched)"
    )


class ObjectiveSpec(SpecModel):
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    autoregressive: AutoregressiveSpec = Field(default_factory=AutoregressiveSpec)


Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimizerSpec(SpecModel):
    lr: float = Field(default=3e-3, gt=0, le=10)
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.95), description="Adam's beta1 and beta2, each in [0, 1)")
    weight_decay: float = Field(default=0.1, ge=0, le=10)
    eps: float = Field(default=1e-8, gt=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0, description="global gradient-norm clip; 0 disables")


class ScheduleSpec(SpecModel):
    kind: Literal["wsd", "cosine", "constant"] = Field(default="wsd", description="warmup-stable-decay or cosine")
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    decay_fraction: float = Field(default=0.2, ge=0, le=1, description="wsd: final fraction spent decaying")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _phases_fit(self):
        if self.kind == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            raise ValueError(SCHEDULE_PHASES_FIT)
        return self


class BatchSpec(SpecModel):
    global_sequences: Optional[int] = Field(
        default=None, ge=1, le=10**8, description=f"default {DEFAULT_GLOBAL_SEQUENCES} when no size is set"
    )
    global_tokens: Optional[int] = Field(default=None, ge=1, le=10**12, description="alternative to global_sequences")
    micro_batch_sequences: int = Field(default=8, ge=1, le=65536, description="sequences per process per micro-step")

    @model_validator(mode="after")
    def _one_size(self):
        if self.global_sequences is not None and self.global_tokens is not None:
            raise ValueError(ONE_BATCH_SIZE)
        return self

    def sequences(self, seq_len: int) -> int:
        if self.global_tokens is None:
            return self.global_sequences or DEFAULT_GLOBAL_SEQUENCES
        if self.global_tokens % seq_len:
            raise ValueError(f"batch.global_tokens: {self.global_tokens} is not a multiple of seq_len ({seq_len})")
        return self.global_tokens // seq_len


class DeepSpeedSpec(SpecModel):
    zero_stage: int = Field(default=0, ge=0, le=3)
    activation_checkpointing: bool = False


class ResourcesSpec(SpecModel):
    nodes: int = Field(default=1, ge=1, le=4096)
    gpus_per_node: int = Field(default=0, ge=0, le=64)
    processes_per_node: Optional[int] = Field(
        default=None, ge=1, le=256, description="defaults to gpus_per_node, or 1 without GPUs"
    )
    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512, pattern=IMAGE_PATTERN,
                       description="the trainer's container image: [REGISTRY/]REPOSITORY[:TAG][@DIGEST]")
    cpu: Optional[str] = Field(
        default=None, pattern=CPU_PATTERN,
        description=f"CPU request (and limit) of each pod; default {CPU_PER_GPU} per GPU, {CPU_WITHOUT_GPUS} without GPUs",
    )
    memory: Optional[str] = Field(
        default=None, pattern=MEMORY_PATTERN,
        description=f"memory request (and limit) of each pod; default {MEMORY_GI_PER_GPU}Gi per GPU, "
        f"{MEMORY_GI_WITHOUT_GPUS}Gi without GPUs",
    )

    _image = field_validator("image", mode="before")(_matching(
        IMAGE_PATTERN, "{value!r} is not an image reference: [REGISTRY[:PORT]/]REPOSITORY[:TAG][@DIGEST], "
        "the repository in lowercase"))
    _cpu = field_validator("cpu", mode="before")(_matching(
        CPU_PATTERN, "{value!r} is not a positive CPU quantity, e.g. 8, 0.5 or 500m"))
    _memory = field_validator("memory", mode="before")(_matching(
        MEMORY_PATTERN, "{value!r} is not a positive memory quantity, e.g. 16Gi, 512Mi or 2G"))

    @property
    def cpu_request(self) -> str:
        """`cpu`, or derived from the GPUs each pod asks for."""
        if self.cpu is not None:
            return self.cpu
        return str(CPU_PER_GPU * self.gpus_per_node if self.gpus_per_node else CPU_WITHOUT_GPUS)

    @property
    def memory_request(self) -> str:
        """`memory`, or derived from the GPUs each pod asks for."""
        if self.memory is not None:
            return self.memory
        return f"{MEMORY_GI_PER_GPU * self.gpus_per_node if self.gpus_per_node else MEMORY_GI_WITHOUT_GPUS}Gi"

    @property
    def procs_per_node(self) -> int:
        return self.processes_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


class CheckpointSpec(SpecModel):
    uri: Optional[str] = Field(
        default=None, max_length=MAX_URI_LENGTH,
        description="s3://bucket/prefix or a local path; default: the run's local output",
    )
    interval_steps: int = Field(default=200, ge=1, le=10**9)
    keep_last: int = Field(default=3, ge=1, le=10000)
    keep_every_epochs: Optional[float] = Field(default=None, gt=0, description="also keep one checkpoint every K epochs")
    endpoint_url: Optional[str] = Field(default=None, max_length=MAX_URI_LENGTH, pattern=r"^https?://[^\s]+$",
                                        description="S3-compatible endpoint: http(s)://HOST[:PORT][/PATH]")
    credentials_secret: Optional[str] = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
        description="Kubernetes Secret holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (never the keys themselves)",
    )
    retry_deadline_seconds: int = Field(
        default=3600, ge=1, le=10**9,
        description="how long checkpoint uploads retry an unreachable store before the run fails",
    )

    _uri = field_validator("uri")(_check_location)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v):
        failed = None if v is None else first_failure(v, ENDPOINT_CHECKS)
        if failed is not None:
            raise ValueError(failed.message)
        return v


class ChoiceTaskSpec(SpecModel):
    examples: int = Field(default=64, ge=0, le=100_000, description="0 disables the continuation-choice task")
    choices: int = Field(default=4, ge=2, le=64)
    context_tokens: int = Field(default=48, ge=1, le=1_048_576)
    continuation_tokens: int = Field(default=16, ge=1, le=1_048_576)

    @property
    def window(self) -> int:
        """Tokens of validation text one example is cut from: its context and its true continuation."""
        return self.context_tokens + self.continuation_tokens


class EvalSpec(SpecModel):
    interval_steps: int = Field(default=100, ge=1, le=10**9)
    batches: int = Field(default=8, ge=1, le=100_000, description="validation micro-batches per evaluation")
    elbo_samples: int = Field(default=4, ge=1, le=1024, description="Monte-Carlo draws of t for the DLM ELBO")
    mc_samples: int = Field(default=16, ge=1, le=4096, description="DLM likelihood draws per choice")
    choice_task: ChoiceTaskSpec = Field(default_factory=ChoiceTaskSpec)


class MetricsSpec(SpecModel):
    port: int = Field(default=9400, ge=0, le=65535, description="Prometheus exposition port on rank 0; 0 disables")
    log_interval_steps: int = Field(default=10, ge=1, le=10**9)


class SchedulingSpec(SpecModel):
    # 63 characters: the name is also the value of the job's label kueue.x-k8s.io/queue-name
    queue: Optional[str] = Field(default=None, max_length=63, pattern=DNS_SUBDOMAIN, description=(
        "a Kueue LocalQueue in the experiment's namespace: each run's job is admitted whole when its quota is free, "
        "and waits Queued until then"))
    priority_class: Optional[str] = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN, description=(
        "a PriorityClass of the cluster for the pods; with a queue, also the Kueue WorkloadPriorityClass of that "
        "name where the cluster has one (else Kueue uses the PriorityClass's value)"))
    max_restarts: int = Field(default=3, ge=0, le=1000, description=(
        "recreations after failures or preemptions (Kueue's included) before the run fails"))

    _queue = field_validator("queue", mode="before")(_matching(
        DNS_SUBDOMAIN, "{value!r} is not a valid LocalQueue name (lowercase letters, digits, '-' and '.', "
        "starting and ending alphanumeric)"))

    _priority_class = field_validator("priority_class", mode="before")(_matching(
        DNS_SUBDOMAIN, "{value!r} is not a valid PriorityClass name (lowercase letters, digits, '-' and '.', "
        "starting and ending alphanumeric)"))
