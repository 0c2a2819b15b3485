"""What `dlmctl compare` reports per sweep point, as data: the CLI prints, plots and dumps it, the API service
returns it as JSON, and all of them compute it here from the same inputs (the experiment with its runs'
status, and each run's evaluations)."""
from __future__ import annotations

import statistics
from enum import Enum
from typing import Any, Mapping, Optional, Sequence

from pydantic import BaseModel, Field

from .contracts import EvalEvent, RunPhase
from .crossover import find_crossover, metric_stderr, metric_value
from .metrics import point_label
from .sections import Arm

SEED_KEY = "seed"  # the sweep key whose runs are repeats of one point, not points of their own
SIGNIFICANT_STDERRS = 2.0  # a crossover margin beyond this many standard errors is unlikely to be noise

BIAS_NOTE = ("The DLM's validation loss is an ELBO, an upper bound on its NLL (AR's is its exact NLL): a "
             "crossover in it is conservative.")
_BIAS_NOTES = {
    "val_loss": BIAS_NOTE,
    "val_bpb": "The DLM's bits per byte come from its ELBO, an upper bound on its NLL (AR's from its exact NLL): "
               "a crossover in them is conservative.",
    "choice_acc": "The DLM scores each choice by a Monte-Carlo ELBO estimate of its log-likelihood (AR by its "
                  "exact log-likelihood), so its accuracy carries estimation noise AR's does not; ± is the "
                  "binomial standard error sqrt(a(1-a)/n).",
}


class Metric(str, Enum):
    """What the arms are compared on."""
    val_loss = "val_loss"
    val_bpb = "val_bpb"
    choice_acc = "choice_acc"

    @property
    def field(self) -> str:
        """The EvalEvent field that holds it."""
        return {"val_loss": "val_loss", "val_bpb": "val_bits_per_byte", "choice_acc": "choice_accuracy"}[self.value]

    @property
    def higher_is_better(self) -> bool:
        return self is Metric.choice_acc

    @property
    def title(self) -> str:
        return {"val_loss": "validation loss", "val_bpb": "validation bits per byte",
                "choice_acc": "choice accuracy"}[self.value]

    @property
    def label(self) -> str:
        """The title with its unit, for an axis."""
        return {"val_loss": "validation loss (nats/token)"}.get(self.value, self.title)


class Axis(str, Enum):
    """Where evaluations of the two arms are aligned: training tokens seen, epochs, or training FLOPs."""
    tokens = "tokens"
    epochs = "epochs"
    flops = "flops"

    @property
    def field(self) -> str:
        return {"tokens": "tokens", "epochs": "epoch", "flops": "flops"}[self.value]

    @property
    def title(self) -> str:
        return {"tokens": "tokens seen", "epochs": "epochs", "flops": "training FLOPs"}[self.value]


class Evaluation(BaseModel):
    """One evaluation of one run: where it was taken and the compared metric's value there."""
    step: int
    tokens: int
    epoch: float
    flops: Optional[float] = None
    value: float
    stderr: Optional[float] = None
    train_loss: Optional[float] = Field(default=None, description="mean train loss since the previous evaluation")


class ArmResult(BaseModel):
    """One run (one arm at one sweep point) on the compared metric."""
    run: str
    phase: Optional[str] = Field(default=None, description="the run's phase; None where the status has none")
    finished: bool = Field(description="the run has ended (Succeeded, Failed or Cancelled): its curve is final")
    evaluations: int = Field(description="evaluations that measured the metric")
    best: Optional[Evaluation] = None
    final: Optional[Evaluation] = None
    choice_accuracy: Optional[float] = Field(default=None, description="at its latest evaluation that measured one")
    choice_accuracy_stderr: Optional[float] = None


class Overfitting(BaseModel):
    """AR overfits when its final evaluation is worse than its best by more than the final's standard error
    while its train loss (at those two evaluations) fell; where the train loss was not recorded, on the
    validation metric alone."""
    overfitting: bool
    validation_worse: bool = Field(description="the final is worse than the best by more than its standard error")
    worse_by: float = Field(description="how much worse the final is than the best, in the metric's units (>= 0)")
    train_loss_falling: Optional[bool] = Field(
        default=None, description="train loss lower at the final evaluation than at the best; None: not recorded")
    best_is_final: bool = Field(description="still improving: the best evaluation is the latest one")


class Crossover(BaseModel):
    """spec.crossover's crossover: the first DLM evaluation after which it stays better than AR's best so far
    (AR's evaluations up to the same position on the axis)."""
    step: int
    tokens: int
    epoch: float
    flops: Optional[float] = None
    dlm_value: float
    dlm_stderr: Optional[float] = Field(default=None, description="the DLM value's standard error (for val_loss: "
                                                                  "the ELBO's Monte-Carlo standard error)")
    ar_best: float
    ar_best_stderr: Optional[float] = None
    margin: float = Field(description="how far the DLM is past AR's best there (positive: better)")
    margin_stderr: Optional[float] = Field(
        default=None, description="sqrt(dlm_stderr^2 + ar_best_stderr^2) of the known ones; None: neither known")
    significant: Optional[bool] = Field(
        default=None, description=f"margin > {SIGNIFICANT_STDERRS:g} margin_stderr; None: no standard error known")
    from_start: bool = Field(description="the DLM was better at every comparable evaluation: no overtaking observed")


class PointComparison(BaseModel):
    """DLM against AR at one sweep point (with one seed, where the sweep sweeps `seed`)."""
    point: dict[str, Any]
    label: str  # spec.metrics.point_label: the `point` label of the run's Prometheus series
    group: str = Field(description="the label of the point without its seed: the runs `seeds` summarises together")
    seed: Optional[int] = Field(default=None, description="the swept seed; None when the sweep does not sweep it")
    runs: dict[str, str]  # arm -> run name
    dlm: Optional[ArmResult] = None
    ar: Optional[ArmResult] = None
    missing: list[Arm] = Field(default_factory=list,
                               description="arms with no evaluation of the metric: not trained, or none yet")
    provisional: bool = Field(description="a run has not finished (or has no status): the verdict may change")
    ar_overfitting: Optional[Overfitting] = None
    crossover: Optional[Crossover] = None


class SeedAgreement(BaseModel):
    """Whether the seeds of one point agree on the crossover."""
    point: dict[str, Any] = Field(description="the sweep point without its seed")
    label: str
    seeds: list[int]
    compared: list[int] = Field(description="seeds whose two arms both have evaluations")
    crossed: list[int] = Field(description="seeds with a crossover")
    agree: Optional[bool] = Field(description="every compared seed crosses over, or none does; None: < 2 compared")
    provisional: bool
    crossover_tokens: list[int] = Field(description="the crossover's tokens, per seed in `crossed`")
    tokens_min: Optional[int] = None
    tokens_max: Optional[int] = None
    tokens_mean: Optional[float] = None
    tokens_std: Optional[float] = Field(default=None, description="sample standard deviation (>= 2 crossovers)")


class ComparisonReport(BaseModel):
    """Everything `dlmctl compare` says about an experiment."""
    name: str = Field(description="the experiment's metadata.name")
    metric: Metric
    by: Axis
    higher_is_better: bool
    bias_note: str
    points: list[PointComparison]
    seeds: list[SeedAgreement] = Field(default_factory=list, description="per point; empty unless seed is swept")


def bias_note(metric: Metric = Metric.val_loss) -> str:
    return _BIAS_NOTES[Metric(metric).value]


def compare_points(experiment, evals: Mapping[str, Sequence[EvalEvent]], metric: Metric = Metric.val_loss,
                   by: Axis = Axis.tokens) -> list[PointComparison]:
    """Per sweep point of `experiment` (a spec.Experiment, its status giving the runs' phases), from `evals`
    (run name -> its eval events in the order it wrote them; missing runs have none)."""
    metric, by = Metric(metric), Axis(by)
    phases = {r.name: str(r.phase.value) for r in (experiment.status.runs if experiment.status else [])}
    points: dict[str, PointComparison] = {}
    for run in experiment.runs():
        label = point_label(run.point)
        p = points.get(label)
        if p is None:
            group = point_label({k: v for k, v in run.point.items() if k != SEED_KEY})
            p = points[label] = PointComparison(point=run.point, label=label, group=group, runs={},
                                                seed=run.point.get(SEED_KEY), provisional=False)
        p.runs[run.arm.value] = run.name
    for p in points.values():
        for arm in Arm:
            name = p.runs.get(arm.value)
            result = _arm_result(name, phases.get(name), evals.get(name, ()), metric) if name else None
            setattr(p, "dlm" if arm is Arm.diffusion else "ar", result)
            if result is None or result.best is None:
                p.missing.append(arm)
            if result is not None and not result.finished:
                p.provisional = True
        if p.ar is not None and p.ar.best is not None:
            p.ar_overfitting = _overfitting(p.ar.best, p.ar.final, metric)
        if not p.missing:
            p.crossover = _crossover(evals[p.runs[Arm.diffusion.value]], evals[p.runs[Arm.autoregressive.value]],
                                     metric, by)
    return list(points.values())


def compare(experiment, evals: Mapping[str, Sequence[EvalEvent]], metric: Metric = Metric.val_loss,
            by: Axis = Axis.tokens) -> ComparisonReport:
    metric, by = Metric(metric), Axis(by)
    points = compare_points(experiment, evals, metric, by)
    seeds = seed_agreement(points) if SEED_KEY in experiment.spec.sweep else []
    return ComparisonReport(name=experiment.metadata.name, metric=metric, by=by,
                            higher_is_better=metric.higher_is_better, bias_note=bias_note(metric), points=points,
                            seeds=seeds)


def seed_agreement(points: Sequence[PointComparison]) -> list[SeedAgreement]:
    """Per group of points that differ only in their seed."""
    groups: dict[str, list[PointComparison]] = {}
    for p in points:
        groups.setdefault(p.group, []).append(p)
    out = []
    for label, members in groups.items():
        compared = [p for p in members if not p.missing]
        crossed = [p for p in compared if p.crossover is not None]
        tokens = [p.crossover.tokens for p in crossed]
        out.append(SeedAgreement(
            point={k: v for k, v in members[0].point.items() if k != SEED_KEY}, label=label,
            seeds=[p.seed for p in members], compared=[p.seed for p in compared], crossed=[p.seed for p in crossed],
            agree=len(crossed) in (0, len(compared)) if len(compared) >= 2 else None,
            provisional=any(p.provisional for p in members), crossover_tokens=tokens,
            tokens_min=min(tokens, default=None), tokens_max=max(tokens, default=None),
            tokens_mean=statistics.fmean(tokens) if tokens else None,
            tokens_std=statistics.stdev(tokens) if len(tokens) >= 2 else None))
    return out


def measured(events: Sequence[EvalEvent], metric: Metric) -> list[EvalEvent]:
    """The evaluations that measured `metric`, in the order they were written."""
    return [e for e in events if metric_value(e, Metric(metric).field) is not None]


def evaluation(e: EvalEvent, metric: Metric) -> Evaluation:
    field = Metric(metric).field
    return Evaluation(step=e.step, tokens=e.tokens, epoch=e.epoch, flops=e.flops, value=metric_value(e, field),
                      stderr=metric_stderr(e, field), train_loss=e.train_loss)


def _arm_result(run: str, phase: Optional[str], events: Sequence[EvalEvent], metric: Metric) -> ArmResult:
    values = measured(events, metric)
    key = lambda e: metric_value(e, metric.field)  # noqa: E731
    best = (max if metric.higher_is_better else min)(values, key=key) if values else None  # the earliest of ties
    choice = measured(events, Metric.choice_acc)
    return ArmResult(run=run, phase=phase, finished=phase is not None and RunPhase(phase).terminal,
                     evaluations=len(values), best=evaluation(best, metric) if values else None,
                     final=evaluation(values[-1], metric) if values else None,
                     choice_accuracy=choice[-1].choice_accuracy if choice else None,
                     choice_accuracy_stderr=choice[-1].choice_accuracy_stderr if choice else None)


def _overfitting(best: Evaluation, final: Evaluation, metric: Metric) -> Overfitting:
    worse_by = max(0.0, (best.value - final.value) if metric.higher_is_better else (final.value - best.value))
    validation_worse = worse_by > (final.stderr or 0.0)
    falling = (final.train_loss < best.train_loss
               if final.train_loss is not None and best.train_loss is not None and final.step != best.step else None)
    return Overfitting(overfitting=validation_worse and falling is not False, validation_worse=validation_worse,
                       worse_by=worse_by, train_loss_falling=falling, best_is_final=best.step == final.step)


def _crossover(dlm: Sequence[EvalEvent], ar: Sequence[EvalEvent], metric: Metric, by: Axis) -> Optional[Crossover]:
    c = find_crossover(dlm, ar, metric=metric.field, by=by.field, higher_is_better=metric.higher_is_better)
    if c is None:
        return None
    se = c.margin_stderr
    return Crossover(step=c.step, tokens=c.tokens, epoch=c.epoch, flops=c.flops, dlm_value=c.dlm_value,
                     dlm_stderr=c.dlm_stderr, ar_best=c.ar_best, ar_best_stderr=c.ar_best_stderr, margin=c.margin,
                     margin_stderr=se, significant=c.margin > SIGNIFICANT_STDERRS * se if se else None,
                     from_start=c.from_start)
