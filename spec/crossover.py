"""Where a diffusion LM overtakes AR on one sweep point: the definition `compare`, the operator's
`dlm_experiment_crossover_*` gauges and the dashboards share.

The crossover is the first DLM evaluation after which the DLM's metric stays better than AR's best so far
(AR's evaluations up to the same position on the axis: tokens seen, epochs, FLOPs or steps). The DLM's
validation loss is an ELBO, an upper bound on its NLL, so a crossover in validation loss is conservative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .contracts import EvalEvent


@dataclass(frozen=True)
class Crossover:
    step: int
    tokens: int
    epoch: float
    dlm_value: float
    ar_best: float  # AR's best value up to that position
    dlm_stderr: Optional[float]  # the DLM value's standard error, where the evaluation measured one
    from_start: bool  # the DLM was better at every comparable evaluation: no overtaking was observed
    flops: Optional[float] = None  # the DLM's training FLOPs there, where the trainer counted them
    ar_best_stderr: Optional[float] = None  # the standard error of AR's best, where measured

    @property
    def margin(self) -> float:
        """How far the DLM is past AR's best there, in the metric's units (positive: better)."""
        return abs(self.ar_best - self.dlm_value)

    @property
    def margin_stderr(self) -> Optional[float]:
        """The standard error of the margin (the two evaluations are independent); None if neither has one."""
        known = [s for s in (self.dlm_stderr, self.ar_best_stderr) if s is not None]
        return math.sqrt(sum(s * s for s in known)) if known else None


def metric_value(e: EvalEvent, metric: str) -> Optional[float]:
    """`e`'s value of `metric` (an EvalEvent field), None where it was not measured or is not finite."""
    v = getattr(e, metric)
    return v if v is not None and math.isfinite(v) else None


def metric_stderr(e: EvalEvent, metric: str) -> Optional[float]:
    """The standard error of `e`'s `metric`, where the evaluation gives one. Bits per byte are the validation
    loss times a constant of the validation text (tokens per byte / ln 2), so their error scales with it."""
    if metric == "val_loss":
        return e.val_loss_stderr
    if metric == "choice_accuracy":
        return e.choice_accuracy_stderr
    if metric == "val_bits_per_byte" and None not in (e.val_loss_stderr, e.val_bits_per_byte) and e.val_loss:
        return e.val_loss_stderr * e.val_bits_per_byte / e.val_loss
    return None


def find_crossover(dlm: Sequence[EvalEvent], ar: Sequence[EvalEvent], *, metric: str = "val_loss",
                   by: str = "tokens", higher_is_better: bool = False) -> Optional[Crossover]:
    """The crossover of `dlm`'s evaluations over `ar`'s (each in any order), or None when the DLM's last
    comparable evaluation is not better than AR's best so far. A DLM evaluation is comparable once AR has
    one at or before its position on `by` (an EvalEvent field); evaluations without `metric` or without a
    position on `by` (e.g. no FLOPs counted) are skipped."""
    def measured(events: Sequence[EvalEvent]) -> list[EvalEvent]:
        return sorted((e for e in events if metric_value(e, metric) is not None and getattr(e, by) is not None),
                      key=lambda e: getattr(e, by))

    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    ar_sorted = measured(ar)
    comparable = []  # (dlm event, AR's best event up to it)
    best, k = None, 0
    for e in measured(dlm):
        while k < len(ar_sorted) and getattr(ar_sorted[k], by) <= getattr(e, by):
            if best is None or better(metric_value(ar_sorted[k], metric), metric_value(best, metric)):
                best = ar_sorted[k]
            k += 1
        if best is not None:
            comparable.append((e, best))
    first = None
    for i in range(len(comparable) - 1, -1, -1):  # the longest run of wins that reaches the last evaluation
        if not better(metric_value(comparable[i][0], metric), metric_value(comparable[i][1], metric)):
            break
        first = i
    if first is None:
        return None
    e, ar_best = comparable[first]
    return Crossover(step=e.step, tokens=e.tokens, epoch=e.epoch, dlm_value=metric_value(e, metric),
                     ar_best=metric_value(ar_best, metric), dlm_stderr=metric_stderr(e, metric),
                     from_start=first == 0, flops=e.flops, ar_best_stderr=metric_stderr(ar_best, metric))
