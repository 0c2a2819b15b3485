"""Where a diffusion LM overtakes AR on one sweep point: the definition `compare`, the operator's
`dlm_experiment_crossover_*` gauges and the dashboards share.

The crossover is the first DLM evaluation after which the DLM's metric stays better than AR's best so far
(AR's evaluations up to the same position on the axis: tokens seen, epochs or steps). The DLM's
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

    @property
    def margin(self) -> float:
        """How far the DLM is past AR's best there, in the metric's units (positive: better)."""
        return abs(self.ar_best - self.dlm_value)


def find_crossover(dlm: Sequence[EvalEvent], ar: Sequence[EvalEvent], *, metric: str = "val_loss",
                   by: str = "tokens", higher_is_better: bool = False) -> Optional[Crossover]:
    """The crossover of `dlm`'s evaluations over `ar`'s (each in any order), or None when the DLM's last
    comparable evaluation is not better than AR's best so far. A DLM evaluation is comparable once AR has
    one at or before its position on `by`; evaluations without `metric` are skipped."""
    def value(e: EvalEvent) -> Optional[float]:
        v = getattr(e, metric)
        return v if v is not None and math.isfinite(v) else None

    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    ar_points = sorted((getattr(e, by), value(e)) for e in ar if value(e) is not None)
    comparable = []  # (dlm event, AR's best up to it)
    best, k = None, 0
    for e in sorted((e for e in dlm if value(e) is not None), key=lambda e: getattr(e, by)):
        while k < len(ar_points) and ar_points[k][0] <= getattr(e, by):
            v = ar_points[k][1]
            best = v if best is None or better(v, best) else best
            k += 1
        if best is not None:
            comparable.append((e, best))
    first = None
    for i in range(len(comparable) - 1, -1, -1):  # the longest run of wins that reaches the last evaluation
        if not better(value(comparable[i][0]), comparable[i][1]):
            break
        first = i
    if first is None:
        return None
    e, ar_best = comparable[first]
    return Crossover(step=e.step, tokens=e.tokens, epoch=e.epoch, dlm_value=value(e), ar_best=ar_best,
                     dlm_stderr=e.val_loss_stderr if metric == "val_loss" else None, from_start=first == 0)
