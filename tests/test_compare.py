"""`dlmctl compare`: per sweep point each arm's best and last value (± s.e.) and where, choice accuracy, AR
overfitting, the crossover (spec.crossover's definition) with its margin in standard errors, and the seeds'
agreement; as a table, or as JSON/YAML that parses back into spec.comparison.ComparisonReport. On synthetic
curves whose answers are known by construction."""
from __future__ import annotations

import json
import math

import pytest
import yaml
from cli_runs import assert_user_error, run
from rich.console import Console

from dlmctl.cli import run_commands
from dlmctl.cli.backends.base import Comparison
from dlmctl.cli.output import crossover_rows, crossover_table, seed_rows, seeds_table
from dlmctl.spec import ExperimentStatus, RunStatus, experiment_from_dict
from dlmctl.spec.comparison import Arm, Axis, ComparisonReport, Metric, compare
from dlmctl.spec.contracts import EvalEvent

TOKENS_PER_STEP = 1000


def experiment(phases=None, **spec):
    """`scarce`, swept over two budgets; every run Succeeded unless `phases` (run name -> phase) says otherwise."""
    exp = experiment_from_dict({
        "apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "scarce"},
        "spec": {"model": {"preset": "nano"}, "data": {"unique_tokens": 4096, "seq_len": 64, "epochs": 2},
                 "sweep": {"data.unique_tokens": [4096, 8192]}, **spec}})
    runs = [RunStatus(name=r.name, arm=r.arm, phase=(phases or {}).get(r.name, "Succeeded")) for r in exp.runs()]
    return exp.model_copy(update={"status": ExperimentStatus(runs=runs)})


def names(exp) -> dict:
    """Run names by (arm, *swept values), or by arm alone without a sweep."""
    return {(r.arm.short, *r.point.values()) if r.point else r.arm.short: r.name for r in exp.runs()}


def curve(*losses, stderr=None, train=None, flops_per_token=None, **fields):
    """Evaluations every 10 steps with these validation losses (and train losses, and FLOPs)."""
    return [EvalEvent(event="eval", time=float(i), step=10 * (i + 1), total_steps=10 * len(losses),
                      epoch=(i + 1) / 2, tokens=10 * (i + 1) * TOKENS_PER_STEP, val_loss=v, val_loss_stderr=stderr,
                      train_loss=train[i] if train else None,
                      flops=flops_per_token * 10 * (i + 1) * TOKENS_PER_STEP if flops_per_token else None,
                      **{k: v[i] for k, v in fields.items()})
            for i, v in enumerate(losses)]


def text(table) -> str:
    console = Console(record=True, width=400)
    console.print(table)
    return " ".join(console.export_text().split())


COLUMNS = ("point", "dlm best", "dlm last", "ar best", "ar last", "choice", "overfitting", "crossover")


def cells(report) -> list[dict[str, str]]:
    """Each sweep point's row as the table and the HTML page show it, a cell's lines joined by spaces."""
    return [{c: " ".join(cell.split()) for c, cell in zip(COLUMNS, row)} for row in crossover_rows(report)]


# AR bottoms out at 3.0 (step 20) and overfits while its train loss keeps falling; the DLM passes 3.0 at
# step 40 for good. At 8192 tokens AR keeps improving and the DLM never catches up.
AR_SCARCE = dict(losses=(3.5, 3.0, 3.2, 3.6, 4.0), stderr=0.01, train=(3.4, 2.9, 2.5, 2.1, 1.8))
DLM_SCARCE = dict(losses=(4.0, 3.4, 3.1, 2.9, 2.8), stderr=0.02, train=(4.1, 3.6, 3.3, 3.1, 3.0))


def scarce_evals(exp):
    n = names(exp)
    return {n["ar", 4096]: curve(*AR_SCARCE["losses"], stderr=0.01, train=AR_SCARCE["train"]),
            n["dlm", 4096]: curve(*DLM_SCARCE["losses"], stderr=0.02, train=DLM_SCARCE["train"]),
            n["ar", 8192]: curve(3.5, 3.0, 2.8, 2.7, 2.6, stderr=0.01),
            n["dlm", 8192]: curve(4.0, 3.4, 3.1, 2.9, 2.8, stderr=0.02)}


def test_the_crossover_is_the_dlm_evaluation_after_which_it_stays_below_ars_best_with_its_margin_in_stderrs():
    exp = experiment()
    report = compare(exp, scarce_evals(exp))
    scarce, plenty = report.points
    c = scarce.crossover
    assert (c.step, c.tokens, c.epoch, c.dlm_value, c.ar_best) == (40, 40_000, 2.0, 2.9, 3.0)
    assert (c.dlm_stderr, c.ar_best_stderr) == (0.02, 0.01)
    assert c.margin == pytest.approx(0.1) and c.margin_stderr == pytest.approx(math.sqrt(0.02 ** 2 + 0.01 ** 2))
    assert c.significant, "0.1 is 4.5 standard errors"
    assert (scarce.dlm.best.value, scarce.dlm.best.tokens, scarce.dlm.best.epoch) == (2.8, 50_000, 2.5)
    assert (scarce.ar.best.value, scarce.ar.best.tokens, scarce.ar.best.epoch) == (3.0, 20_000, 1.0)
    assert scarce.ar.final.value == 4.0 and scarce.ar_overfitting.overfitting
    assert scarce.ar_overfitting.worse_by == pytest.approx(1.0) and scarce.ar_overfitting.train_loss_falling
    assert plenty.crossover is None and not plenty.ar_overfitting.overfitting
    assert report.bias_note.startswith("The DLM's validation loss is an ELBO, an upper bound on its NLL")

    row, other = cells(report)
    assert row["point"] == "data.unique_tokens=4096"
    assert row["dlm best"] == "2.800 ± 0.020 50k tokens, epoch 2.50"
    assert row["ar best"] == "3.000 ± 0.010 20k tokens, epoch 1.00"
    assert (row["dlm last"], row["ar last"]) == ("2.800 ± 0.020", "4.000 ± 0.010")
    assert row["overfitting"] == "yes: last 1.000 worse than its best, train loss falling"
    assert row["crossover"] == ("at 40k tokens, epoch 2.00, (step 40) DLM 2.900 ± 0.020 < AR best 3.000 ± 0.010 "
                                "margin 0.100 = 4.5 s.e. (significant)")
    assert other["crossover"] == "none"
    assert "an upper bound on its NLL" in text(crossover_table(report))


def test_a_margin_within_two_standard_errors_is_not_significant():
    exp = experiment(sweep={})
    n = names(exp)
    report = compare(exp, {n["ar"]: curve(3.5, 3.0, 3.2, stderr=0.05), n["dlm"]: curve(4.0, 3.1, 2.95, stderr=0.05)})
    c = report.points[0].crossover
    assert c.margin == pytest.approx(0.05) and c.margin_stderr == pytest.approx(0.05 * math.sqrt(2))
    assert c.significant is False
    assert cells(report)[0]["crossover"].endswith("margin 0.050 = 0.7 s.e. (not significant)")
    unmeasured = compare(exp, {n["ar"]: curve(3.5, 3.0, 3.2), n["dlm"]: curve(4.0, 3.1, 2.95)})
    assert unmeasured.points[0].crossover.significant is None
    assert cells(unmeasured)[0]["crossover"].endswith("margin 0.050 (no s.e. measured)")


def test_an_ar_model_that_never_overfits_says_so():
    exp = experiment(sweep={})
    n = names(exp)
    report = compare(exp, {n["ar"]: curve(3.5, 3.0, 2.8, stderr=0.01), n["dlm"]: curve(4.0, 3.4, 3.1, stderr=0.01)})
    o = report.points[0].ar_overfitting
    assert (o.overfitting, o.best_is_final, o.worse_by) == (False, True, 0.0)
    assert cells(report)[0]["overfitting"] == "no: never overfit (best at its last evaluation)"


def test_overfitting_needs_validation_worse_by_more_than_its_stderr_while_the_train_loss_falls():
    exp = experiment(sweep={})
    n = names(exp)

    def verdict(ar):
        return compare(exp, {n["ar"]: ar, n["dlm"]: curve(4.0, 3.9, 3.8)}).points[0].ar_overfitting

    noise = verdict(curve(3.5, 3.0, 3.02, stderr=0.05, train=(3.4, 3.0, 2.8)))
    assert (noise.overfitting, noise.validation_worse) == (False, False), "0.02 worse is within 0.05"
    diverging = verdict(curve(3.5, 3.0, 3.5, stderr=0.05, train=(3.4, 3.0, 3.6)))
    assert (diverging.overfitting, diverging.validation_worse, diverging.train_loss_falling) == (False, True, False)
    unknown = verdict(curve(3.5, 3.0, 3.5, stderr=0.05))
    assert (unknown.overfitting, unknown.train_loss_falling) == (True, None), "judged on validation alone"
    overfit = verdict(curve(3.5, 3.0, 3.5, stderr=0.05, train=(3.4, 3.0, 2.6)))
    assert (overfit.overfitting, overfit.train_loss_falling) == (True, True)


def test_a_missing_arm_is_named_and_there_is_no_crossover_to_report():
    exp = experiment(sweep={})
    n = names(exp)
    only_dlm = compare(exp, {n["dlm"]: curve(4.0, 3.4)}).points[0]
    assert only_dlm.missing == [Arm.autoregressive] and only_dlm.crossover is None and only_dlm.ar_overfitting is None
    (row,) = cells(compare(exp, {n["dlm"]: curve(4.0, 3.4)}))
    assert row["ar best"] == "none measured (Succeeded)" and row["crossover"] == "n/a: AR none measured (Succeeded)"

    single = experiment(sweep={}, arms=["diffusion"])
    (point,) = compare(single, {names(single)["dlm"]: curve(4.0, 3.4)}).points
    assert point.ar is None and point.missing == [Arm.autoregressive]
    (row,) = cells(compare(single, {names(single)["dlm"]: curve(4.0, 3.4)}))
    assert row["ar best"] == "not trained" and row["crossover"] == "n/a: AR not trained"


def test_runs_still_running_make_the_verdict_provisional():
    exp = experiment(sweep={}, phases={"scarce-dlm": "Running"})
    n = names(exp)
    report = compare(exp, {n["ar"]: curve(3.5, 3.0, 2.9), n["dlm"]: curve(4.0, 3.4)})
    point = report.points[0]
    assert point.provisional and not point.dlm.finished and point.ar.finished
    (row,) = cells(report)
    assert row["point"] == "- (running: provisional)"
    assert row["dlm last"] == "3.400 Running" and row["crossover"] == "none yet"
    not_started = compare(experiment(sweep={}, phases={"scarce-dlm": "Pending"}), {n["ar"]: curve(3.5)}).points[0]
    assert not_started.provisional and not_started.missing == [Arm.diffusion]
    assert cells(compare(experiment(sweep={}, phases={"scarce-dlm": "Pending"}), {}))[0]["dlm best"] == \
        "none yet (Pending)"


def test_choice_accuracy_crosses_over_upwards():
    exp = experiment(sweep={})
    n = names(exp)
    se = lambda a: math.sqrt(a * (1 - a) / 400)  # noqa: E731  400 questions
    ar_acc, dlm_acc = (0.50, 0.60, 0.62, 0.60), (0.40, 0.55, 0.66, 0.70)
    evals = {n["ar"]: curve(3, 3, 3, 3, choice_accuracy=ar_acc, choice_accuracy_stderr=[se(a) for a in ar_acc]),
             n["dlm"]: curve(3, 3, 3, 3, choice_accuracy=dlm_acc, choice_accuracy_stderr=[se(a) for a in dlm_acc])}
    report = compare(exp, evals, Metric.choice_acc)
    point = report.points[0]
    assert report.higher_is_better and (point.dlm.best.value, point.ar.best.value) == (0.70, 0.62)
    assert (point.dlm.choice_accuracy, point.dlm.choice_accuracy_stderr) == (0.70, se(0.70))
    c = point.crossover
    assert (c.step, c.dlm_value, c.ar_best) == (30, 0.66, 0.62)
    assert c.margin_stderr == pytest.approx(math.hypot(se(0.66), se(0.62)))
    assert point.ar_overfitting.worse_by == pytest.approx(0.02), "0.60 is below its best 0.62"
    assert "DLM 0.660 ± 0.024 > AR best 0.620 ± 0.024" in cells(report)[0]["crossover"]
    # read as a loss (lower is better) the same curves would never cross over
    assert compare(exp, evals).points[0].crossover is None


def test_the_arms_are_aligned_on_the_axis_asked_for():
    exp = experiment(sweep={})
    n = names(exp)
    # AR's causal attention makes its tokens cheaper: 4 FLOPs per token against the DLM's 6
    evals = {n["ar"]: curve(4.0, 3.0, 2.5, 2.7, flops_per_token=4), n["dlm"]: curve(3.5, 2.8, 2.45, 2.4,
                                                                                    flops_per_token=6)}
    by_tokens = compare(exp, evals, by=Axis.tokens).points[0].crossover
    assert (by_tokens.step, by_tokens.from_start) == (10, True)
    by_flops = compare(exp, evals, by=Axis.flops).points[0].crossover
    assert (by_flops.step, by_flops.flops, by_flops.ar_best) == (30, 180_000.0, 2.5)
    by_epochs = compare(exp, evals, by=Axis.epochs).points[0].crossover
    assert by_epochs == by_tokens, "one budget: epochs and tokens are proportional"
    no_flops = {run: [e.model_copy(update={"flops": None}) for e in events] for run, events in evals.items()}
    report = compare(exp, no_flops, by=Axis.flops)
    assert report.points[0].crossover is None
    assert cells(report)[0]["crossover"] == "n/a: the runs recorded no FLOPs to align on"


def seeded_evals(exp, crossing: dict[int, int]) -> dict:
    """AR bottoms out at 3.0; seed s's DLM drops below it at step crossing[s] (tokens 1000 x step), or never."""
    evals = {}
    for r in exp.runs():
        seed = r.point["seed"]
        if r.arm is Arm.autoregressive:
            evals[r.name] = curve(3.5, 3.0, 3.2, 3.6, 4.0, 4.2)
        else:
            cross = crossing.get(seed)
            evals[r.name] = curve(*[2.9 if cross and 10 * (i + 1) >= cross else 3.3 for i in range(6)])
    return evals


def test_seeds_are_grouped_into_points_and_their_crossovers_compared():
    exp = experiment(sweep={"seed": [1, 2, 3], "data.unique_tokens": [4096]})
    report = compare(exp, seeded_evals(exp, {1: 30, 2: 40, 3: 50}))
    assert [(p.seed, p.group, p.crossover.tokens) for p in report.points] == [
        (1, "data.unique_tokens=4096", 30_000), (2, "data.unique_tokens=4096", 40_000),
        (3, "data.unique_tokens=4096", 50_000)]
    (agreement,) = report.seeds
    assert (agreement.seeds, agreement.compared, agreement.crossed, agreement.agree) == ([1, 2, 3],) * 3 + (True,)
    assert (agreement.tokens_min, agreement.tokens_max, agreement.tokens_mean) == (30_000, 50_000, 40_000)
    assert agreement.tokens_std == pytest.approx(10_000)  # sample standard deviation of 30k, 40k, 50k
    assert agreement.point == {"data.unique_tokens": 4096}
    (row,) = seed_rows(report)
    assert list(row) == ["data.unique_tokens=4096", "3/3", "3/3 (seeds 1, 2, 3)", "30k to 50k, mean 40k (sd 10k)", "yes"]


def test_seeds_that_disagree_say_so():
    exp = experiment(sweep={"seed": [1, 2, 3], "data.unique_tokens": [4096]})
    (agreement,) = compare(exp, seeded_evals(exp, {2: 40})).seeds
    assert (agreement.crossed, agreement.agree, agreement.crossover_tokens) == ([2], False, [40_000])
    assert agreement.tokens_std is None
    (row,) = seed_rows(compare(exp, seeded_evals(exp, {2: 40})))
    assert list(row) == ["data.unique_tokens=4096", "3/3", "1/3 (seeds 2)", "40k", "no"]
    (none,) = compare(exp, seeded_evals(exp, {})).seeds
    assert (none.crossed, none.agree) == ([], True), "no seed crosses over: they agree on that"
    assert compare(experiment(), {}).seeds == [] and seeds_table(compare(experiment(), {})) is None
    assert "agreement across seeds" in text(seeds_table(compare(exp, seeded_evals(exp, {2: 40}))))


class FakeBackend:
    """The command's side of a backend: what `compare` returns is all the command reads."""

    def __init__(self, comparison):
        self.comparison, self.asked = comparison, []

    def compare(self, name):
        self.asked.append(name)
        return self.comparison


@pytest.fixture
def scarce_backend(monkeypatch):
    exp = experiment()
    backend = FakeBackend(Comparison(exp, scarce_evals(exp)))
    monkeypatch.setattr(run_commands, "backend", lambda ctx: backend)
    return backend


@pytest.mark.parametrize("fmt, parse", [("json", json.loads), ("yaml", yaml.safe_load)])
def test_json_and_yaml_parse_back_into_the_report(capsys, scarce_backend, fmt, parse):
    code, out, err = run(capsys, "compare", "scarce", "-o", fmt, "--metric", "val_loss", "--by", "epochs")
    assert code == 0, err
    report = ComparisonReport.model_validate(parse(out))
    assert (report.name, report.metric, report.by) == ("scarce", Metric.val_loss, Axis.epochs)
    assert report.points[0].crossover.tokens == 40_000 and report.points[1].crossover is None
    assert report == compare(scarce_backend.comparison.experiment, scarce_backend.comparison.evals, by=Axis.epochs)


def test_the_table_output_has_the_runs_the_points_and_the_bias(capsys, scarce_backend):
    code, out, err = run(capsys, "compare", "scarce")
    assert code == 0, err
    assert "tokens seen" in out and "scarce-dlm-ut4096" in out  # the per-run table
    assert "an upper bound on its NLL" in out and "margin 0.100 = 4.5 s.e." in out


def test_bad_options_and_a_missing_matplotlib_are_one_line_errors(capsys, scarce_backend, monkeypatch, tmp_path):
    code, _, err = run(capsys, "compare", "scarce", "--metric", "perplexity")
    assert code == 2 and "perplexity" in err and "Traceback" not in err
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    code, _, err = run(capsys, "compare", "scarce", "--plot", tmp_path / "x.png")
    assert_user_error(code, err, "--plot: needs matplotlib", "pip install 'dlmctl[plot]'")
    assert scarce_backend.asked == [] and not (tmp_path / "x.png").exists(), "refused before asking the backend"


def test_the_commands_choices_are_the_reports():
    assert [m.value for m in run_commands.CompareMetric] == [m.value for m in Metric]
    assert [a.value for a in run_commands.CompareAxis] == [a.value for a in Axis]
