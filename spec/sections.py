"""The sections of `spec`: data, objectives, optimisation, resources, checkpoints, eval, metrics."""
from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import Strict

URI_SCHEMES = ("s3://", "file://", "/", "./", "../", "~")
BUILTIN_CORPORA = ("python-stdlib",)

# Rules the models check beyond single fields. The CRD's CEL rules (spec/crd.py) say the same words.
TOKENIZER_PATH_REQUIRED = "path: required when kind is 'file'"
TOKENIZER_PATH_FORBIDDEN = "path: only allowed when kind is 'file'"
SCHEDULE_PHASES_FIT = "warmup_fraction + decay_fraction must be <= 1"
ONE_BATCH_SIZE = "set global_sequences or global_tokens, not both"
UNSUPPORTED_URI = "only s3:// and local paths are supported"
DEFAULT_GLOBAL_SEQUENCES = 32  # when neither batch.global_sequences nor batch.global_tokens is set

# A pod's CPU and memory when the spec does not say: a share per GPU that leaves headroom on a typical
# 8-GPU node (8 x 10 CPUs = 80 of 96 cores, 8 x 100Gi = 800Gi of 1Ti), or a small CPU-only pod.
CPU_PER_GPU = 10
MEMORY_GI_PER_GPU = 100
CPU_WITHOUT_GPUS = 4
MEMORY_GI_WITHOUT_GPUS = 16


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
            raise ValueError(f"unknown built-in corpus {name!r}; choose one of {', '.join(BUILTIN_CORPORA)}")
    elif not value.startswith(URI_SCHEMES) and not re.match(r"^[\w.-]+(/[\w.-]*)*$", value):
        raise ValueError(f"{value!r} is not a local path, s3:// URI or builtin:<corpus>")
    return value


class TokenizerSpec(Strict):
    kind: Literal["bpe", "byte", "file"] = Field(
        default="bpe", description="bpe: byte-level BPE trained on the unique data; byte: raw bytes; file: tokenizer.json"
    )
    vocab_size: int = Field(default=4096, ge=260, le=1_048_576, description="BPE vocabulary size")
    path: Optional[str] = Field(default=None, description="tokenizer.json, for kind: file")

    @model_validator(mode="after")
    def _path_iff_file(self):
        if self.kind == "file" and not self.path:
            raise ValueError(TOKENIZER_PATH_REQUIRED)
        if self.kind != "file" and self.path:
            raise ValueError(TOKENIZER_PATH_FORBIDDEN)
        return self


class DataSpec(Strict):
    train: str = Field(
        default="builtin:python-stdlib",
        description="training text: a local file or folder, an s3:// URI, or builtin:python-stdlib",
    )
    validation: Optional[str] = Field(
        default=None, description="validation text; when unset, held-out documents of the training source"
    )
    validation_tokens: int = Field(default=65536, ge=1, le=10**10, description="size of the validation set")
    unique_tokens: int = Field(
        default=1_000_000, ge=1, le=10**13, description="unique training tokens, repeated for `epochs` passes"
    )
    epochs: float = Field(default=4, gt=0, le=100_000, description="passes over the unique tokens (may be fractional)")
    seq_len: int = Field(default=256, ge=8, le=1_048_576, description="tokens per training sequence")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    cache: Optional[str] = Field(default=None, description="token shard cache: local dir or s3:// prefix")

    _source = field_validator("train", "validation")(lambda v: v if v is None else _check_source(v))

    @model_validator(mode="after")
    def _at_least_one_sequence(self):
        if self.unique_tokens < self.seq_len:
            raise ValueError(
                f"unique_tokens: {self.unique_tokens} is less than one sequence (seq_len={self.seq_len})"
            )
        return self

    @property
    def unique_sequences(self) -> int:
        return self.unique_tokens // self.seq_len


class DiffusionSpec(Strict):
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
        default=0.0, ge=0, le=1, description="fraction of batches cut to a random length (LLaDA uses 0.01)"
    )


class AutoregressiveSpec(Strict):
    input_mask_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of input tokens replaced by [MASK] (targets untouched)"
    )


class ObjectiveSpec(Strict):
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    autoregressive: AutoregressiveSpec = Field(default_factory=AutoregressiveSpec)


Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimizerSpec(Strict):
    lr: float = Field(default=3e-3, gt=0, le=10)
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.95), description="Adam's beta1 and beta2, each in [0, 1)")
    weight_decay: float = Field(default=0.1, ge=0, le=10)
    eps: float = Field(default=1e-8, gt=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0, description="global gradient-norm clip; 0 disables")


class ScheduleSpec(Strict):
    kind: Literal["wsd", "cosine", "constant"] = Field(default="wsd", description="warmup-stable-decay or cosine")
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    decay_fraction: float = Field(default=0.2, ge=0, le=1, description="wsd: final fraction spent decaying")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _phases_fit(self):
        if self.kind == "wsd" and self.warmup_fraction + self.decay_fraction > 1:
            raise ValueError(SCHEDULE_PHASES_FIT)
        return self


class BatchSpec(Strict):
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


class DeepSpeedSpec(Strict):
    zero_stage: int = Field(default=0, ge=0, le=3)
    activation_checkpointing: bool = False


class ResourcesSpec(Strict):
    nodes: int = Field(default=1, ge=1, le=4096)
    gpus_per_node: int = Field(default=0, ge=0, le=64)
    processes_per_node: Optional[int] = Field(
        default=None, ge=1, le=256, description="defaults to gpus_per_node, or 1 without GPUs"
    )
    image: str = Field(default="ghcr.io/dlmctl/trainer:0.1.0", min_length=1, max_length=512)
    cpu: Optional[str] = Field(
        default=None, pattern=r"^\d+(\.\d+)?m?$",
        description=f"CPU request (and limit) of each pod; default {CPU_PER_GPU} per GPU, {CPU_WITHOUT_GPUS} without GPUs",
    )
    memory: Optional[str] = Field(
        default=None, pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
        description=f"memory request (and limit) of each pod; default {MEMORY_GI_PER_GPU}Gi per GPU, "
        f"{MEMORY_GI_WITHOUT_GPUS}Gi without GPUs",
    )

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


class CheckpointSpec(Strict):
    uri: Optional[str] = Field(
        default=None, description="s3://bucket/prefix or a local path; default: the run's local output"
    )
    interval_steps: int = Field(default=200, ge=1, le=10**9)
    keep_last: int = Field(default=3, ge=1, le=10000)
    keep_every_epochs: Optional[float] = Field(default=None, gt=0, description="also keep one checkpoint every K epochs")
    endpoint_url: Optional[str] = Field(default=None, pattern=r"^https?://[^\s]+$", description="S3-compatible endpoint")
    credentials_secret: Optional[str] = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
        description="Kubernetes Secret holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (never the keys themselves)",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v):
        if v is not None and not v.startswith(URI_SCHEMES) and "://" in v:
            raise ValueError(f"{v!r}: {UNSUPPORTED_URI}")
        return v


class ChoiceTaskSpec(Strict):
    examples: int = Field(default=64, ge=0, le=100_000, description="0 disables the continuation-choice task")
    choices: int = Field(default=4, ge=2, le=64)
    context_tokens: int = Field(default=48, ge=1)
    continuation_tokens: int = Field(default=16, ge=1)


class EvalSpec(Strict):
    interval_steps: int = Field(default=100, ge=1, le=10**9)
    batches: int = Field(default=8, ge=1, le=100_000, description="validation micro-batches per evaluation")
    elbo_samples: int = Field(default=4, ge=1, le=1024, description="Monte-Carlo draws of t for the DLM ELBO")
    mc_samples: int = Field(default=16, ge=1, le=4096, description="DLM likelihood draws per choice")
    choice_task: ChoiceTaskSpec = Field(default_factory=ChoiceTaskSpec)


class MetricsSpec(Strict):
    port: int = Field(default=9400, ge=0, le=65535, description="Prometheus exposition port on rank 0; 0 disables")
    log_interval_steps: int = Field(default=10, ge=1)


class SchedulingSpec(Strict):
    queue: Optional[str] = Field(default=None, max_length=253)
    priority_class: Optional[str] = Field(default=None, max_length=253)
    max_restarts: int = Field(default=3, ge=0, le=1000)
