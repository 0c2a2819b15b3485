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
    from dlmctl.spec.comparison import ComparisonReport

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
    preparations = [f"data {d.name}: {d.phase} ({d.completed}/{d.workers} pods done) {d.message or ''}".rstrip()
                    for d in status.data]
    table = Table(title=title, title_justify="left", caption="\n".join(preparations) or None, caption_justify="left")
    numeric = ("step", "epoch", "train loss", "val loss", "restarts")
    queued = any(r.queue for r in status.runs)  # the column only where Kueue queues runs
    columns = ("run", "arm", "phase", "reason", *(("queue",) if queued else ()), "step", "epoch", "train loss",
               "val loss", "restarts", "message")
    for col in columns:
        table.add_column(col, justify="right" if col in numeric else "left")
    for r in status.runs:
        step = f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step)
        queue = (queue_words(r),) if queued else ()
        table.add_row(r.name, r.arm.value, str(r.phase), r.reason or "", *queue, step, fmt(r.epoch, 2),
                      fmt(r.train_loss), fmt(r.val_loss), str(r.restarts), r.message or "")
    return table


def queue_words(r: "RunStatus") -> str:
    """The LocalQueue, the run's place in line while it waits, and the ClusterQueue that admitted it."""
    if not r.queue:
        return ""
    return (r.queue + (f" #{r.queue_position}" if r.queue_position else "")
            + (f" ({r.cluster_queue})" if r.cluster_queue else ""))


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


def print_comparison(comparison: "Comparison", metric: str = "val_loss", by: str = "tokens",
                     report: Optional["ComparisonReport"] = None) -> None:
    """The per-run table, then per sweep point the comparison of the arms (spec.comparison) and, where the
    sweep sweeps `seed`, whether the seeds agree."""
    from dlmctl.spec.comparison import compare

    console.print(comparison_table(comparison.experiment))
    report = report or compare(comparison.experiment, comparison.evals, metric, by)
    for table in (crossover_table(report), seeds_table(report)):
        if table is not None:
            console.print(table)


def report_title(report: "ComparisonReport") -> str:
    direction = "higher" if report.higher_is_better else "lower"
    return (f"{report.name}: DLM vs AR per sweep point, {report.metric.title} ({direction} is better) "
            f"aligned by {report.by.title}")


def report_notes(report: "ComparisonReport") -> str:
    from dlmctl.spec.comparison import SIGNIFICANT_STDERRS

    better = "above" if report.higher_is_better else "below"
    return (f"crossover: the first DLM evaluation after which its {report.metric.title} stays {better} AR's best "
            f"so far (at the same {report.by.title}); significant: margin > {SIGNIFICANT_STDERRS:g} standard "
            "errors. AR overfits when its last evaluation is worse than its best by more than its standard error "
            f"while its train loss falls. {report.bias_note}")


CROSSOVER_COLUMNS = ("sweep point", "DLM best", "DLM last", "AR best", "AR last", "choice acc", "AR overfitting",
                     "crossover")
SEED_COLUMNS = ("sweep point", "seeds compared", "seeds crossing over", "crossover tokens", "seeds agree")


def crossover_rows(report: "ComparisonReport") -> list[tuple[str, ...]]:
    """One row of CROSSOVER_COLUMNS per sweep point: what the table and the HTML page show."""
    rows = []
    for p in report.points:
        point = _point_cell(p.point, p.label) + ("\n(running: provisional)" if p.provisional else "")
        choice = f"DLM {_choice(p.dlm)}\nAR {_choice(p.ar)}"
        flops = report.by.value == "flops"
        rows.append((point, _best(p.dlm, flops), _last(p.dlm), _best(p.ar, flops), _last(p.ar), choice,
                     _overfitting_cell(p), _crossover_cell(p, report)))
    return rows


def crossover_table(report: "ComparisonReport") -> Optional[Table]:
    """Per sweep point: each arm's best value (± s.e.) and where it was reached, its last, choice accuracy,
    whether AR overfits, and the crossover as spec.crossover defines it (the dashboards mark the same).
    None when the experiment has no runs."""
    if not report.points:
        return None
    table = Table(title=report_title(report), title_justify="left", caption=report_notes(report),
                  caption_justify="left")
    for col in CROSSOVER_COLUMNS:
        table.add_column(col, justify="right" if col in ("DLM last", "AR last") else "left")
    for row in crossover_rows(report):
        table.add_row(*row)
    return table


def seed_rows(report: "ComparisonReport") -> list[tuple[str, ...]]:
    rows = []
    for s in report.seeds:
        point = _point_cell(s.point, s.label) + ("\n(running: provisional)" if s.provisional else "")
        compared = f"{len(s.compared)}/{len(s.seeds)}"
        crossed = f"{len(s.crossed)}/{len(s.compared)}" + (f" (seeds {', '.join(map(str, s.crossed))})"
                                                            if s.crossed else "")
        if not s.crossover_tokens:
            spread = "-"
        elif len(s.crossover_tokens) == 1:
            spread = fmt_tokens(s.tokens_min)
        else:
            spread = (f"{fmt_tokens(s.tokens_min)} to {fmt_tokens(s.tokens_max)}, mean "
                      f"{fmt_tokens(round(s.tokens_mean))} (sd {fmt_tokens(round(s.tokens_std))})")
        agree = "-" if s.agree is None else "yes" if s.agree else "no"
        rows.append((point, compared, crossed, spread, agree))
    return rows


def seeds_table(report: "ComparisonReport") -> Optional[Table]:
    """Per point swept over seeds: how many seeds cross over and the spread of their crossover tokens."""
    if not report.seeds:
        return None
    table = Table(title=f"{report.name}: agreement across seeds", title_justify="left")
    for col in SEED_COLUMNS:
        table.add_column(col)
    for row in seed_rows(report):
        table.add_row(*row)
    return table


def _stderr(se: Optional[float]) -> str:
    """` ± 0.012`, or with one significant digit when smaller than the values' last digit (` ± 4e-05`)."""
    if se is None:
        return ""
    return f" ± {se:.3f}" if se >= 1e-3 or se == 0 else f" ± {se:.1g}"


def _missing(arm) -> Optional[str]:
    """Why an arm has nothing to compare, or None."""
    if arm is None:
        return "not trained"
    if arm.best is None:
        return f"none measured ({arm.phase})" if arm.finished else f"none yet ({arm.phase or 'no status'})"
    return None


def fmt_flops(flops: Optional[float]) -> str:
    """Two significant digits: 4.3e15."""
    if flops is None:
        return "-"
    mantissa, _, exponent = f"{flops:.1e}".partition("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _point_cell(point: dict, label: str) -> str:
    return "\n".join(f"{k}={v}" for k, v in point.items()) if point else (label or "-")


def _best(arm, flops: bool = False) -> str:
    """The best value and where: tokens and epochs (and FLOPs when the arms are aligned by them)."""
    if (missing := _missing(arm)) is not None:
        return missing
    b = arm.best
    where = f"{fmt_tokens(b.tokens)} tokens, epoch {b.epoch:.2f}" + (f"\n{fmt_flops(b.flops)} FLOPs" if flops else "")
    return f"{b.value:.3f}{_stderr(b.stderr)}\n{where}"


def _last(arm) -> str:
    if arm is None or arm.final is None:
        return "-"
    phase = "" if arm.phase in (None, "Succeeded") else f"\n{arm.phase}"
    return f"{arm.final.value:.3f}{_stderr(arm.final.stderr)}{phase}"


def _choice(arm) -> str:
    if arm is None or arm.choice_accuracy is None:
        return "-"
    return f"{arm.choice_accuracy:.3f}{_stderr(arm.choice_accuracy_stderr)}"


def _overfitting_cell(p) -> str:
    o = p.ar_overfitting
    if o is None:
        return "-"
    train = {True: "train loss falling", False: "train loss rising too", None: "train loss not recorded"}
    if o.overfitting:
        return f"yes: last {o.worse_by:.3f} worse\nthan its best,\n{train[o.train_loss_falling]}"
    if o.best_is_final:
        return "no: never overfit\n(best at its last\nevaluation)"
    if o.validation_worse:
        return f"no: last {o.worse_by:.3f} worse\nthan its best but\n{train[o.train_loss_falling]}"
    return f"no: last within its\ns.e. of its best\n({o.worse_by:.3f} worse)"


def _crossover_cell(p, report: "ComparisonReport") -> str:
    from dlmctl.spec.comparison import Axis

    if p.missing:
        arms = {"DLM": p.dlm, "AR": p.ar}
        return "n/a: " + "; ".join(f"{short} {_missing(arm)}" for short, arm in arms.items() if _missing(arm))
    if report.by is Axis.flops and (p.dlm.best.flops is None or p.ar.best.flops is None):
        return "n/a: the runs recorded no FLOPs to align on"
    c = p.crossover
    if c is None:
        return "none yet" if p.provisional else "none"
    sign = ">" if report.higher_is_better else "<"
    lines = [f"at {fmt_tokens(c.tokens)} tokens, epoch {c.epoch:.2f},", f"{fmt_flops(c.flops)} FLOPs (step {c.step})" if c.flops else f"(step {c.step})",
             f"DLM {c.dlm_value:.3f}{_stderr(c.dlm_stderr)}", f"{sign} AR best {c.ar_best:.3f}{_stderr(c.ar_best_stderr)}"]
    if c.margin_stderr:
        verdict = "significant" if c.significant else "not significant"
        lines += [f"margin {c.margin:.3f} = {c.margin / c.margin_stderr:.1f} s.e.", f"({verdict})"]
    else:
        lines += [f"margin {c.margin:.3f}", "(no s.e. measured)"]
    if c.from_start:
        lines.append("(DLM ahead from its first comparable evaluation)")
    return "\n".join(lines)


def progress_line(r: "RunStatus") -> str:
    parts = [f"{r.name:<24}", f"{r.phase:<9}"]
    if r.total_steps:
        parts.append(f"step {r.step}/{r.total_steps}")
        parts.append(f"epoch {r.epoch:.2f}")
    if r.train_loss is not None:
        parts.append(f"loss {r.train_loss:.4f}")
    if r.val_loss is not None:
        parts.append(f"val {r.val_loss:.4f}")
    if r.message and r.phase in ("Failed", "Cancelled", "Unschedulable", "Restarting", "Preempted", "Queued"):
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
