"""Tables and lines the commands print (rich is imported here, when a command runs, not for --help)."""
from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from dlmctl.spec import Experiment, Run, RunStatus

    from .backends import ExperimentSummary
    from .backends.base import Comparison

# Piped output (CI logs, files) gets room for whole run names instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
console = Console(highlight=False, soft_wrap=True, width=_WIDTH)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_tokens(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def wall_time(run: "RunStatus") -> Optional[float]:
    if run.startTime is None:
        return None
    end = run.completionTime or datetime.now(timezone.utc)
    return (end - run.startTime).total_seconds()


def age(created: Optional[datetime]) -> str:
    if created is None:
        return "-"
    return fmt_duration((datetime.now(timezone.utc) - created).total_seconds())


def runs_plan_table(experiment: "Experiment", runs: list["Run"]) -> Table:
    table = Table(title=f"experiment {experiment.metadata.name}: {len(runs)} runs", title_justify="left")
    table.add_column("run", no_wrap=True)
    table.add_column("arm")
    table.add_column("sweep point")
    for col in ("steps", "global batch", "world size"):
        table.add_column(col, justify="right")
    for run in runs:
        point = ", ".join(f"{k}={v}" for k, v in run.point.items()) or "-"
        table.add_row(run.name, run.arm.value, point, str(run.spec.total_steps),
                      str(run.spec.global_batch_sequences), str(run.spec.resources.world_size))
    return table


def summaries_table(summaries: list["ExperimentSummary"], namespaces: bool = False) -> Table:
    table = Table()
    for col in ("NAMESPACE",) * namespaces + ("NAME", "PHASE", "RUNS", "AGE"):
        table.add_column(col)
    for s in summaries:
        table.add_row(*(s.namespace or "-",) * namespaces, s.name, str(s.phase), f"{s.succeeded}/{s.runs}",
                      age(s.created))
    return table


def status_table(experiment: "Experiment") -> Table:
    status = experiment.status
    title = f"{experiment.metadata.name}: {status.phase} ({status.progress or '-'} runs succeeded)"
    table = Table(title=title, title_justify="left")
    numeric = ("step", "epoch", "train loss", "val loss", "restarts")
    for col in ("run", "arm", "phase", "reason", "step", "epoch", "train loss", "val loss", "restarts", "message"):
        table.add_column(col, justify="right" if col in numeric else "left")
    for r in status.runs:
        step = f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step)
        table.add_row(r.name, r.arm.value, str(r.phase), r.reason or "", step, fmt(r.epoch, 2), fmt(r.train_loss),
                      fmt(r.val_loss), str(r.restarts), r.message or "")
    return table


def comparison_table(experiment: "Experiment") -> Table:
    """Per run: arm, train loss, validation loss, choice accuracy, tokens seen, epochs, wall time; and, as a
    reference, the loss of a model that learnt only token frequencies."""
    runs = experiment.status.runs
    unigram = sorted({round(r.unigram_entropy, 3) for r in runs if r.unigram_entropy is not None})
    caption = (f"unigram entropy of the training tokens: {', '.join(map(str, unigram))} nats per token "
               "(the loss of a model that learnt only token frequencies)") if unigram else None
    table = Table(title=f"{experiment.metadata.name}: DLM vs AR", title_justify="left", caption=caption,
                  caption_justify="left")
    for col in ("run", "arm", "phase", "train loss", "val loss", "choice acc", "tokens seen", "epochs", "wall time"):
        table.add_column(col, justify="left" if col in ("run", "arm", "phase") else "right")
    for r in runs:
        table.add_row(r.name, r.arm.value, str(r.phase), fmt(r.train_loss), fmt(r.val_loss), fmt(r.choice_accuracy, 2),
                      fmt_tokens(r.tokens), fmt(r.epoch, 2), fmt_duration(wall_time(r)))
    return table


def print_comparison(comparison: "Comparison") -> None:
    console.print(comparison_table(comparison.experiment))
    crossovers = crossover_table(comparison)
    if crossovers is not None:
        console.print(crossovers)


def crossover_table(comparison: "Comparison") -> Optional[Table]:
    """Per sweep point with both arms (spec.comparison): each arm's best validation loss and where it was
    reached, AR's final one and whether it overfits, and the crossover as spec.crossover defines it (the
    dashboards mark the same). None when the experiment does not train both arms."""
    from dlmctl.spec.comparison import BIAS_NOTE, compare_points

    points = compare_points(comparison.experiment, comparison.evals)
    if not points:
        return None
    table = Table(title=f"{comparison.experiment.metadata.name}: crossover (validation loss against tokens seen)",
                  title_justify="left", caption_justify="left",
                  caption="crossover: the first DLM evaluation after which its validation loss stays below AR's best "
                          f"so far. {BIAS_NOTE}")
    for col in ("sweep point", "DLM best (at tokens)", "AR best (at tokens)", "AR final", "AR overfitting", "crossover"):
        table.add_column(col, justify="left" if col in ("sweep point", "crossover") else "right")
    for p in points:
        overfitting = "-" if p.ar_overfitting is None else ("yes" if p.ar_overfitting else "no")
        table.add_row(p.label or "-", _at(p.dlm_best), _at(p.ar_best), fmt(p.ar_final and p.ar_final.val_loss),
                      overfitting, _crossover_cell(p.crossover))
    return table


def _at(e) -> str:
    if e is None:
        return "-"
    stderr = f" ± {e.val_loss_stderr:.3f}" if e.val_loss_stderr else ""
    return f"{e.val_loss:.3f}{stderr} ({fmt_tokens(e.tokens)})"


def _crossover_cell(c) -> str:
    if c is None:
        return "none"
    stderr = f" ± {c.dlm_val_loss_stderr:.3f}" if c.dlm_val_loss_stderr else ""
    where = (f"at {fmt_tokens(c.tokens)} tokens (epoch {c.epoch:.2f}): DLM {c.dlm_val_loss:.3f}{stderr} "
             f"< AR best {c.ar_best_val_loss:.3f}")
    return where + (" (DLM ahead from its first comparable evaluation)" if c.from_start else "")


def progress_line(r: "RunStatus") -> str:
    parts = [f"{r.name:<24}", f"{r.phase:<9}"]
    if r.total_steps:
        parts.append(f"step {r.step}/{r.total_steps}")
        parts.append(f"epoch {r.epoch:.2f}")
    if r.train_loss is not None:
        parts.append(f"loss {r.train_loss:.4f}")
    if r.val_loss is not None:
        parts.append(f"val {r.val_loss:.4f}")
    if r.message and r.phase in ("Failed", "Cancelled", "Unschedulable", "Restarting", "Preempted"):
        parts.append(r.message)
    return "  ".join(parts)


def dump(data, output: str) -> str:
    """`data` as JSON or YAML, with anything secret-looking masked (dlmctl.spec.redact): printed specs and
    Kubernetes objects end up in terminals, CI logs and bug reports."""
    from dlmctl.spec.redact import redact

    data = redact(data)
    if output == "json":
        return json.dumps(data, indent=2)
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
