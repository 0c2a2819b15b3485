"""The contracts between dlmctl's processes, defined once: phase names and the rule that turns run
phases into an experiment phase, how a run reaches its trainer, and the metrics events the trainer
writes and `get`/`compare`/the operator read."""
from __future__ import annotations

from enum import Enum
from typing import Any, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

RUN_SPEC_ENV = "DLMCTL_RUN_SPEC"  # the resolved Run as JSON, in every trainer process's environment
METRICS_FILE = "metrics.jsonl"  # one event per line, in the run's output folder and in its checkpoint store


class _Phase(str, Enum):
    """A phase name; `terminal` phases never change again."""

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self.value in _TERMINAL[type(self).__name__]


class RunPhase(_Phase):
    Pending = "Pending"
    Queued = "Queued"  # waiting in its Kueue LocalQueue for quota (its message says why, and where it stands)
    Admitted = "Admitted"  # Kueue admitted the whole job; its pods are being created and placed
    Unschedulable = "Unschedulable"  # its pods cannot be placed (the scheduler says why)
    Running = "Running"
    Restarting = "Restarting"  # failed in a way worth retrying; recreated after a backoff
    Preempted = "Preempted"  # its pods were evicted, preempted or lost with their node; resumes from a checkpoint
    Succeeded = "Succeeded"
    Failed = "Failed"
    Cancelled = "Cancelled"


class ExperimentPhase(_Phase):
    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Cancelled = "Cancelled"
    Invalid = "Invalid"  # the spec broke a rule the API server could not check; status names the field


class DataPhase(_Phase):
    """Of a data preparation (the Indexed Job that fills an s3:// token cache before the runs that read it)."""
    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Cancelled = "Cancelled"


_TERMINAL = {
    "RunPhase": {"Succeeded", "Failed", "Cancelled"},
    "ExperimentPhase": {"Succeeded", "Failed", "Cancelled", "Invalid"},
    "DataPhase": {"Succeeded", "Failed", "Cancelled"},
}
TERMINAL_RUN_PHASES = frozenset(p for p in RunPhase if p.terminal)
TERMINAL_EXPERIMENT_PHASES = frozenset(p for p in ExperimentPhase if p.terminal)


def is_terminal(phase: str) -> bool:
    """For either kind of phase, given as a name."""
    return phase in {p.value for p in TERMINAL_RUN_PHASES | TERMINAL_EXPERIMENT_PHASES}


def experiment_phase(run_phases: Iterable[RunPhase | str]) -> ExperimentPhase:
    """Every run finished: Cancelled if any was cancelled, else Failed if any failed, else Succeeded.
    Otherwise Pending while no run has started, else Running."""
    phases = [RunPhase(p) for p in run_phases]
    if not phases:
        return ExperimentPhase.Pending
    if all(p.terminal for p in phases):
        if RunPhase.Cancelled in phases:
            return ExperimentPhase.Cancelled
        if RunPhase.Failed in phases:
            return ExperimentPhase.Failed
        return ExperimentPhase.Succeeded
    if all(p in (RunPhase.Pending, RunPhase.Queued, RunPhase.Admitted, RunPhase.Unschedulable) for p in phases):
        return ExperimentPhase.Pending
    return ExperimentPhase.Running


# ---- metrics events (metrics.jsonl) ---------------------------------------------------------------


class _Event(BaseModel):
    # Readers ignore fields they do not know, so an older CLI reads a newer trainer's events.
    model_config = ConfigDict(extra="ignore")
    time: float


class StartEvent(_Event):
    event: Literal["start"]
    step: int
    total_steps: int
    world_size: int
    parameters: int
    unigram_entropy: Optional[float] = None


class TrainEvent(_Event):
    event: Literal["train"]
    step: int
    total_steps: int
    epoch: float
    tokens: int
    train_loss: Optional[float] = None
    lr: Optional[float] = None
    tokens_per_second: Optional[float] = None
    mfu: Optional[float] = None


class EvalEvent(_Event):
    event: Literal["eval"]
    step: int
    total_steps: int
    epoch: float
    tokens: int
    val_loss: Optional[float] = None
    val_loss_stderr: Optional[float] = None
    val_bits_per_byte: Optional[float] = Field(
        default=None, description="val_loss in bits per byte of validation text: comparable across tokenizers")
    choice_accuracy: Optional[float] = None
    choice_accuracy_stderr: Optional[float] = Field(
        default=None, description="binomial standard error of choice_accuracy, sqrt(a(1-a)/n)")
    flops: Optional[float] = Field(default=None, description="training FLOPs spent up to this evaluation")
    train_loss: Optional[float] = Field(
        default=None, description="mean training loss over the steps since the previous evaluation (overfitting shows "
                                  "as validation rising while this falls)")


class CheckpointEvent(_Event):
    """A checkpoint whose manifest was written: it is complete and verified, a run can resume from it."""

    event: Literal["checkpoint"]
    step: int
    epoch: float
    uri: str


class DoneEvent(_Event):
    event: Literal["done"]
    step: int
    total_steps: int
    epoch: float
    tokens: int
    export: Optional[str] = None


MetricsEvent = Union[StartEvent, TrainEvent, EvalEvent, CheckpointEvent, DoneEvent]
_EVENT = TypeAdapter(MetricsEvent)
EVENT_TYPES = {cls.model_fields["event"].annotation.__args__[0]: cls for cls in MetricsEvent.__args__}


def parse_event(record: Any) -> Optional[MetricsEvent]:
    """A typed event from one parsed metrics line; None for a line that is not one (other tools' lines)."""
    if not isinstance(record, dict) or record.get("event") not in EVENT_TYPES:
        return None
    try:
        return _EVENT.validate_python(record)
    except ValidationError:
        return None


class RunProgress(BaseModel):
    """Where a run is, folded from its metrics events (the latest value of each), and its evaluations (the
    curve the crossover is found on; not a status field)."""

    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    tokens: int = 0
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    val_loss_stderr: Optional[float] = None
    choice_accuracy: Optional[float] = None
    unigram_entropy: Optional[float] = None
    last_checkpoint: Optional[str] = Field(default=None, description="the newest complete, verified checkpoint")
    last_checkpoint_step: Optional[int] = None
    done: bool = False
    evals: list[EvalEvent] = Field(default_factory=list, description="every evaluation so far, in file order")


def fold_progress(events: Iterable[MetricsEvent], progress: Optional[RunProgress] = None) -> RunProgress:
    """Apply events in order to `progress` (a fresh one by default, else changed in place); returns it."""
    p = progress or RunProgress()
    for e in events:
        if isinstance(e, (TrainEvent, DoneEvent, EvalEvent)):
            p.step, p.total_steps, p.epoch, p.tokens = e.step, e.total_steps, e.epoch, e.tokens
        if isinstance(e, TrainEvent) and e.train_loss is not None:
            p.train_loss = e.train_loss
        elif isinstance(e, EvalEvent):
            p.evals.append(e)
            if e.val_loss is not None:
                p.val_loss, p.val_loss_stderr = e.val_loss, e.val_loss_stderr
            if e.choice_accuracy is not None:
                p.choice_accuracy = e.choice_accuracy
        elif isinstance(e, StartEvent):
            p.total_steps = e.total_steps
            if e.unigram_entropy is not None:
                p.unigram_entropy = e.unigram_entropy
        elif isinstance(e, CheckpointEvent):
            p.last_checkpoint, p.last_checkpoint_step = e.uri, e.step
        elif isinstance(e, DoneEvent):
            p.done = True
    return p
