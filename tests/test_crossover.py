"""Where a diffusion LM overtakes AR (spec/crossover.py): on curves whose crossover is known by
construction, the first DLM evaluation from which it stays better than AR's best so far."""
from __future__ import annotations

import random

import pytest

from dlmctl.spec.contracts import EvalEvent
from dlmctl.spec.crossover import find_crossover, metric_stderr


def curve(*values, tokens_per_step: int = 1000, epochs_per_step: float = 0.25, first_step: int = 1,
          metric: str = "val_loss", stderr: float | None = 0.01) -> list[EvalEvent]:
    """One evaluation per step from `first_step`, with `values` of `metric` (None: not measured)."""
    return [EvalEvent(event="eval", time=0.0, step=s, total_steps=100, epoch=s * epochs_per_step,
                      tokens=s * tokens_per_step, **{metric: v},
                      val_loss_stderr=stderr if metric == "val_loss" and v is not None else None)
            for s, v in enumerate(values, start=first_step)]


AR = curve(4.0, 3.5, 3.3, 3.4, 3.6)  # best 3.3 at step 3, then overfits
DLM = curve(5.0, 4.0, 3.4, 3.2, 3.1)  # 3.4 at step 3 does not beat 3.3; 3.2 at step 4 does, and it stays ahead


def test_the_crossover_is_the_first_evaluation_from_which_the_dlm_stays_ahead():
    found = find_crossover(DLM, AR)
    assert (found.step, found.tokens, found.epoch) == (4, 4000, 1.0)
    assert (found.dlm_value, found.ar_best, found.dlm_stderr) == (3.2, 3.3, 0.01)
    assert found.margin == pytest.approx(0.1) and not found.from_start


def test_no_crossover_while_the_dlm_is_behind():
    assert find_crossover(curve(5.0, 4.5, 4.2, 4.0, 3.9), AR) is None


def test_no_crossover_against_an_ar_model_that_never_overfits():
    ar = curve(4.0, 3.5, 3.0, 2.6, 2.3)  # still improving at every evaluation
    dlm = curve(5.0, 4.0, 3.2, 2.8, 2.4)  # improving too, always behind AR at the same position
    assert find_crossover(dlm, ar) is None


def test_a_dlm_better_from_its_first_comparable_evaluation_crosses_over_there():
    ar = curve(4.0, 3.5, 3.4, first_step=2)
    dlm = curve(3.0, 3.8, 3.2, 3.1)  # step 1 comes before AR's first evaluation: nothing to compare with
    found = find_crossover(dlm, ar)
    assert (found.step, found.dlm_value, found.ar_best, found.from_start) == (2, 3.8, 4.0, True)


def test_a_dlm_that_led_and_fell_behind_at_the_end_has_no_crossover():
    dlm = curve(3.9, 3.4, 3.2, 3.3, 3.35)  # ahead until step 3, behind AR's best 3.3 at step 5
    assert find_crossover(dlm, AR) is None


def test_the_order_of_the_evaluations_does_not_matter():
    dlm, ar = DLM[:], AR[:]
    random.Random(0).shuffle(dlm)
    random.Random(1).shuffle(ar)
    assert find_crossover(dlm, ar) == find_crossover(DLM, AR)


def test_evaluations_without_the_metric_are_skipped():
    dlm = DLM[:3] + curve(None, first_step=4) + DLM[3:] + curve(None, float("nan"), first_step=6)
    ar = AR + curve(None, float("nan"), first_step=6)
    found = find_crossover(dlm, ar)
    assert found == find_crossover(DLM, AR) and found.step == 4
    assert find_crossover(curve(None, None), AR) is None and find_crossover(DLM, curve(None)) is None
    assert find_crossover([], AR) is None and find_crossover(DLM, []) is None


def test_the_axis_decides_which_ar_evaluations_a_dlm_evaluation_is_compared_with():
    ar = curve(4.0, 3.0, 2.5, 2.7)  # epoch e after 1000 e tokens
    dlm = curve(3.5, 2.8, 2.45, 2.4, tokens_per_step=2000)  # a pool twice as large: 2000 tokens per epoch
    by_epoch = find_crossover(dlm, ar, by="epoch")
    assert (by_epoch.step, by_epoch.ar_best, by_epoch.from_start) == (1, 4.0, True)  # ahead at every epoch
    by_tokens = find_crossover(dlm, ar)  # at 2000 tokens AR was already at 3.0, at 4000 at 2.5
    assert (by_tokens.step, by_tokens.tokens, by_tokens.ar_best, by_tokens.from_start) == (3, 6000, 2.5, False)


def test_choice_accuracy_crosses_over_upwards():
    ar = curve(0.5, 0.6, 0.62, 0.6, metric="choice_accuracy")
    dlm = curve(0.4, 0.55, 0.65, 0.7, metric="choice_accuracy")
    found = find_crossover(dlm, ar, metric="choice_accuracy", higher_is_better=True)
    assert (found.step, found.dlm_value, found.ar_best, found.dlm_stderr) == (3, 0.65, 0.62, None)
    assert found.margin == pytest.approx(0.03)
    assert find_crossover(dlm, ar, metric="choice_accuracy") is None, "lower is better by default"


def test_flops_align_the_arms_by_compute_and_evaluations_without_flops_are_skipped():
    # AR's causal attention makes a token cheaper: 4 FLOPs per token against the DLM's 6 (made-up units)
    ar = [e.model_copy(update={"flops": 4.0 * e.tokens}) for e in curve(4.0, 3.0, 2.5, 2.7)]
    dlm = [e.model_copy(update={"flops": 6.0 * e.tokens}) for e in curve(3.5, 2.8, 2.45, 2.4)]
    # by tokens: at 2000 AR's best is 3.0 (2.8 wins), at 3000 it is 2.5 (2.45 wins), at 4000 2.5 (2.4 wins)
    assert find_crossover(dlm, ar).step == 1 and find_crossover(dlm, ar).from_start
    # by FLOPs the DLM at step s has spent 6000 s: AR's evaluations up to then are those with 4000 t <= 6000 s
    by_flops = find_crossover(dlm, ar, by="flops")
    # step 1 (6000): AR best 4.0 (at 4000), 3.5 wins; step 2 (12000): AR 2.5 (at 12000), 2.8 loses;
    # step 3 (18000): AR best 2.5, 2.45 wins; step 4 (24000): 2.4 wins
    assert (by_flops.step, by_flops.flops, by_flops.ar_best, by_flops.from_start) == (3, 18000.0, 2.5, False)
    without = dlm[:2] + [e.model_copy(update={"flops": None}) for e in dlm[2:]]
    assert find_crossover(without, ar, by="flops") is None, "its last evaluations are not on the axis"
    assert find_crossover(curve(3.5, 2.8), ar, by="flops") is None


def test_the_margin_has_the_standard_error_of_a_difference_of_two_independent_estimates():
    ar = curve(4.0, 3.5, 3.3, 3.4, 3.6, stderr=0.03)
    found = find_crossover(curve(5.0, 4.0, 3.4, 3.2, 3.1, stderr=0.04), ar)
    assert (found.dlm_stderr, found.ar_best_stderr) == (0.04, 0.03)
    assert found.margin_stderr == pytest.approx(0.05)  # sqrt(0.04^2 + 0.03^2)
    only_dlm = find_crossover(curve(5.0, 4.0, 3.4, 3.2, 3.1, stderr=0.04), curve(4.0, 3.5, 3.3, 3.4, stderr=None))
    assert (only_dlm.ar_best_stderr, only_dlm.margin_stderr) == (None, 0.04)
    assert find_crossover(curve(5.0, 3.2, stderr=None), curve(4.0, 3.3, stderr=None)).margin_stderr is None


def test_bits_per_byte_carry_the_validation_losss_relative_standard_error():
    # bits per byte = val_loss x (tokens per byte / ln 2): the same factor scales the error
    e = EvalEvent(event="eval", time=0.0, step=1, total_steps=1, epoch=1.0, tokens=1, val_loss=2.0,
                  val_loss_stderr=0.02, val_bits_per_byte=0.75, choice_accuracy=0.6, choice_accuracy_stderr=0.05)
    assert metric_stderr(e, "val_bits_per_byte") == pytest.approx(0.0075)
    assert metric_stderr(e, "val_loss") == 0.02 and metric_stderr(e, "choice_accuracy") == 0.05
    assert metric_stderr(e.model_copy(update={"val_loss_stderr": None}), "val_bits_per_byte") is None
