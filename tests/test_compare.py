"""`dlmctl compare`'s crossover table: per sweep point, each arm's best validation loss, whether AR
overfits, and the crossover exactly where the curves put it (spec.crossover's definition)."""
from __future__ import annotations

from rich.console import Console

from dlmctl.cli.backends.base import Comparison
from dlmctl.cli.output import crossover_table
from dlmctl.spec import experiment_from_dict
from dlmctl.spec.contracts import EvalEvent

TOKENS_PER_STEP = 1000


def experiment(**spec):
    return experiment_from_dict({
        "apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "scarce"},
        "spec": {"model": {"preset": "nano"}, "data": {"unique_tokens": 4096, "seq_len": 64, "epochs": 2},
                 "sweep": {"data.unique_tokens": [4096, 8192]}, **spec}})


def curve(*losses, stderr=None):
    """Evaluations every 10 steps with these validation losses."""
    return [EvalEvent(event="eval", time=float(i), step=10 * (i + 1), total_steps=10 * len(losses),
                      epoch=(i + 1) / 2, tokens=10 * (i + 1) * TOKENS_PER_STEP, val_loss=v, val_loss_stderr=stderr)
            for i, v in enumerate(losses)]


def rows(exp, evals) -> dict[str, str]:
    console = Console(record=True, width=400)
    console.print(crossover_table(Comparison(exp, evals)))
    lines = console.export_text().splitlines()
    cells = [line.replace("│", " ").strip() for line in lines if "data.unique_tokens=" in line]
    return {cell.split()[0]: cell for cell in cells}


def test_the_crossover_is_reported_at_the_dlm_evaluation_after_which_it_stays_below_ars_best():
    exp = experiment()
    names = {(r.arm.short, r.point["data.unique_tokens"]): r.name for r in exp.runs()}
    evals = {
        # AR bottoms out at 3.0 (step 20) and overfits; the DLM passes 3.0 at step 40 for good
        names["ar", 4096]: curve(3.5, 3.0, 3.2, 3.6, 4.0, stderr=0.01),
        names["dlm", 4096]: curve(4.0, 3.4, 3.1, 2.9, 2.8, stderr=0.02),
        # AR keeps improving; the DLM never catches up
        names["ar", 8192]: curve(3.5, 3.0, 2.8, 2.7, 2.6),
        names["dlm", 8192]: curve(4.0, 3.4, 3.1, 2.9, 2.8),
    }
    table = rows(exp, evals)
    scarce = table["data.unique_tokens=4096"]
    assert "at 40k tokens (epoch 2.00): DLM 2.900 ± 0.020 < AR best 3.000" in scarce
    assert "2.800 ± 0.020 (50k)" in scarce and "3.000 ± 0.010 (20k)" in scarce
    assert " yes " in scarce  # AR's final 4.0 is above its best 3.0 by more than its standard error
    plenty = table["data.unique_tokens=8192"]
    assert plenty.rstrip().endswith("none") and " no " in plenty


def test_runs_without_evaluations_and_single_arm_experiments():
    exp = experiment()
    table = rows(exp, {})
    assert all(line.rstrip().endswith("none") for line in table.values()) and len(table) == 2
    assert crossover_table(Comparison(experiment(arms=["diffusion"]), {})) is None
