"""What `dlmctl compare` reports per sweep point, as data: the CLI prints it, the API service returns it as
JSON, and both compute it here from the same inputs (the experiment and each run's evaluations)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from pydantic import BaseModel

from .contracts import EvalEvent
from .crossover import find_crossover
from .metrics import point_label
from .sections import Arm

BIAS_NOTE = ("The DLM's validation loss is an ELBO, an upper bound on its NLL: a crossover in it is conservative.")


class Evaluation(BaseModel):
    """One evaluation of one run: where it was taken and what it measured."""
    step: int
    tokens: int
    epoch: float
    val_loss: float
    val_loss_stderr: Optional[float] = None


class Crossover(BaseModel):
    """spec.crossover's crossover: the first DLM evaluation after which it stays below AR's best so far."""
    step: int
    tokens: int
    epoch: float
    dlm_val_loss: float
    dlm_val_loss_stderr: Optional[float] = None
    ar_best_val_loss: float
    from_start: bool


class PointComparison(BaseModel):
    point: dict[str, Any]
    label: str  # spec.metrics.point_label: the `point` label of the run's Prometheus series
    runs: dict[str, str]  # arm -> run name
    dlm_best: Optional[Evaluation] = None
    ar_best: Optional[Evaluation] = None
    ar_final: Optional[Evaluation] = None
    ar_overfitting: Optional[bool] = None  # AR's final loss above its best by more than its standard error
    crossover: Optional[Crossover] = None


def compare_points(experiment, evals: Mapping[str, Sequence[EvalEvent]]) -> list[PointComparison]:
    """Per sweep point of `experiment` (a spec.Experiment), from `evals` (run name -> its eval events in
    the order it wrote them; missing runs have none). Empty unless the experiment trains both arms."""
    if set(experiment.spec.arms) != {Arm.diffusion, Arm.autoregressive}:
        return []
    points: dict[str, PointComparison] = {}
    for run in experiment.runs():
        label = point_label(run.point)
        points.setdefault(label, PointComparison(point=run.point, label=label, runs={})).runs[run.arm.value] = run.name
    for p in points.values():
        dlm = list(evals.get(p.runs[Arm.diffusion.value], ()))
        ar = [e for e in evals.get(p.runs[Arm.autoregressive.value], ()) if e.val_loss is not None]
        p.dlm_best, p.ar_best = _best(dlm), _best(ar)
        if ar:
            p.ar_final = _evaluation(ar[-1])
            p.ar_overfitting = p.ar_final.val_loss - p.ar_best.val_loss > (p.ar_final.val_loss_stderr or 0.0)
        c = find_crossover(dlm, ar)
        if c is not None:
            p.crossover = Crossover(step=c.step, tokens=c.tokens, epoch=c.epoch, dlm_val_loss=c.dlm_value,
                                    dlm_val_loss_stderr=c.dlm_stderr, ar_best_val_loss=c.ar_best,
                                    from_start=c.from_start)
    return list(points.values())


def _best(evals: Sequence[EvalEvent]) -> Optional[Evaluation]:
    measured = [e for e in evals if e.val_loss is not None]
    return _evaluation(min(measured, key=lambda e: e.val_loss)) if measured else None


def _evaluation(e: EvalEvent) -> Evaluation:
    return Evaluation(step=e.step, tokens=e.tokens, epoch=e.epoch, val_loss=e.val_loss,
                      val_loss_stderr=e.val_loss_stderr)
