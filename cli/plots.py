"""`dlmctl compare --plot/--html`: DLM against AR per sweep point, drawn from the same report the table
prints (spec.comparison). matplotlib is imported here, and this module only when a plot is asked for."""
from __future__ import annotations

import base64
import html as htmlmod
import io
import shlex
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from .errors import UserError
from .output import fmt_flops, fmt_tokens

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from dlmctl.spec.comparison import ComparisonReport, PointComparison
    from dlmctl.spec.contracts import EvalEvent

PANEL_INCHES = (5.2, 3.6)  # one sweep point
HEADER_INCHES = 0.9  # the title and the legend above the panels
DPI = 100
COLORS = {"diffusion": "tab:blue", "autoregressive": "tab:orange"}
NAMES = {"diffusion": "DLM", "autoregressive": "AR"}
CROSSOVER_COLOR = "tab:green"
ROW_KEY = "data.unique_tokens"  # the budget: one row of panels per value, when swept


def require_matplotlib(option: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"{option}: needs matplotlib, which is not installed; pip install 'dlmctl[plot]'") from None


def grid(report: "ComparisonReport") -> tuple[list[list[Optional[str]]], str, str]:
    """The panels' layout: a grid of point groups (the sweep points without their seed), one row per value of
    the budget (data.unique_tokens, else the first swept key) and one column per combination of the other
    swept keys; returns (rows of group labels, None where the sweep has no such point), row key, column keys."""
    from dlmctl.spec.comparison import SEED_KEY

    points = {p.group: {k: v for k, v in p.point.items() if k != SEED_KEY} for p in report.points}
    keys = list(next(iter(points.values()), {}))
    row_key = ROW_KEY if ROW_KEY in keys else (keys[0] if keys else "")
    col_keys = [k for k in keys if k != row_key]
    row_values = list(dict.fromkeys(p.get(row_key) for p in points.values()))
    col_values = list(dict.fromkeys(tuple(p[k] for k in col_keys) for p in points.values()))
    where = {(p.get(row_key), tuple(p[k] for k in col_keys)): label for label, p in points.items()}
    return ([[where.get((r, c)) for c in col_values] for r in row_values], row_key, ", ".join(col_keys))


def comparison_figure(report: "ComparisonReport", evals: Mapping[str, Sequence["EvalEvent"]]) -> "Figure":
    """One panel per sweep point: each arm's metric against report.by, ± its standard error, each arm's best
    marked (star), the crossover marked (dashed line, annotated); seeds as separate thin lines. Every curve's
    Line2D has the run name as its gid (the best marker `<run>:best`, the crossover line `<run>:crossover`)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    layout, _, _ = grid(report)
    nrows, ncols = len(layout), len(layout[0]) if layout else 1
    fig = Figure(figsize=(ncols * PANEL_INCHES[0], nrows * PANEL_INCHES[1] + HEADER_INCHES), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(max(nrows, 1), ncols, squeeze=False)
    groups: dict[str, list["PointComparison"]] = {}
    for p in report.points:
        groups.setdefault(p.group, []).append(p)
    for row, labels in zip(axes, layout or [[None]]):
        for ax, label in zip(row, labels):
            if label is None or label not in groups:
                ax.set_visible(False)
                continue
            _panel(ax, report, groups[label], evals)
    direction = "higher" if report.higher_is_better else "lower"
    title = (f"{report.name}: DLM vs AR, {report.metric.title} ({direction} is better) against "
             f"{report.by.title}")
    # one column of panels is narrower than the title: wrap it to the figure's width
    fig.suptitle(textwrap.fill(title, width=max(40, int(11 * ncols * PANEL_INCHES[0]))), fontsize=12)
    handles = [Line2D([], [], color=COLORS[a], marker="o", markersize=4, label=f"{NAMES[a]} (± s.e.)")
               for a in ("diffusion", "autoregressive")]
    handles += [Line2D([], [], color="0.3", marker="*", markersize=11, linestyle="none", label="best"),
                Line2D([], [], color=CROSSOVER_COLOR, linestyle="--", label="crossover")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9)
    return fig


def _panel(ax: "Axes", report: "ComparisonReport", points: Sequence["PointComparison"],
           evals: Mapping[str, Sequence["EvalEvent"]]) -> None:
    from dlmctl.spec.comparison import measured

    field = report.by.field
    seeded = len(points) > 1
    curves: list[tuple[list[float], list[float]]] = []
    notes: list[str] = []
    for p in points:
        for arm, result in (("diffusion", p.dlm), ("autoregressive", p.ar)):
            run = p.runs.get(arm)
            events = [e for e in measured(evals.get(run, ()), report.metric) if getattr(e, field) is not None]
            if not events:
                if not seeded or p is points[0]:
                    notes.append(f"{NAMES[arm]}: " + ("not trained" if run is None else "no evaluations"
                                                      + ("" if result is None or result.evaluations == 0
                                                         else f" with {report.by.title}")))
                continue
            events.sort(key=lambda e: getattr(e, field))
            x = [float(getattr(e, field)) for e in events]
            y = [float(getattr(e, report.metric.field)) for e in events]
            errors = [_stderr(e, report.metric) for e in events]
            curves.append((x, y))
            bars = ax.errorbar(x, y, yerr=[s or 0.0 for s in errors] if any(errors) else None,
                               color=COLORS[arm], linewidth=0.9 if seeded else 1.6, alpha=0.7 if seeded else 1.0,
                               marker="o", markersize=2.5 if seeded else 3.5, capsize=2, elinewidth=0.8)
            bars.lines[0].set_gid(run)
            best = result.best if result else None
            if best is not None and getattr(best, field) is not None:
                ax.plot([getattr(best, field)], [best.value], marker="*", markersize=12, linestyle="none",
                        color=COLORS[arm], markeredgecolor="black", markeredgewidth=0.6, zorder=5,
                        gid=f"{run}:best")
    _zoom(ax, curves, report.higher_is_better)
    for p in points:
        _mark_crossover(ax, report, p, seeded)
    crossed = [p.crossover for p in points if p.crossover]
    if seeded:
        tokens = sorted(c.tokens for c in crossed)
        spread = "" if not tokens else (f", at {fmt_tokens(tokens[0])} tokens" if len(tokens) == 1 else
                                        f", at {fmt_tokens(tokens[0])} to {fmt_tokens(tokens[-1])} tokens")
        notes.append(f"{len(crossed)}/{len(points)} seeds cross over{spread}")
    elif crossed:
        (c,) = crossed
        flops = f"{fmt_flops(c.flops)} FLOPs, " if report.by.value == "flops" else ""
        note = f"crossover at {flops}{fmt_tokens(c.tokens)} tokens, epoch {c.epoch:.2f}\nmargin {c.margin:.3f}"
        if c.margin_stderr:
            note += f" = {c.margin / c.margin_stderr:.1f} s.e.{'' if c.significant else ', not significant'}"
        notes.append(note)
    if notes:  # in the corner the early evaluations leave empty: low for a loss, high for an accuracy
        top = report.higher_is_better
        ax.text(0.02, 0.97 if top else 0.03, "\n".join(notes), transform=ax.transAxes, fontsize=8,
                va="top" if top else "bottom", ha="left", color="0.15",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.8", "pad": 3})
    if report.by.value != "epochs":
        _count_axis(ax, [x for xs, _ in curves for x in xs], "tokens" if report.by.value == "tokens" else "FLOPs")
    title = ", ".join(f"{k}={v}" for k, v in points[0].point.items() if k != "seed") or report.name
    if any(p.provisional for p in points):
        title += " (running: provisional)"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(report.by.title, fontsize=9)
    ax.set_ylabel(report.metric.label, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, which="major", alpha=0.3)


def _mark_crossover(ax: "Axes", report: "ComparisonReport", p: "PointComparison", seeded: bool) -> None:
    c = p.crossover
    if c is None:
        return
    x = {"tokens": c.tokens, "epochs": c.epoch, "flops": c.flops}[report.by.value]
    ax.axvline(x, color=CROSSOVER_COLOR, linestyle="--", linewidth=0.9 if seeded else 1.4,
               gid=f"{p.runs.get('diffusion')}:crossover")


def _zoom(ax: "Axes", curves: Sequence[tuple[list[float], list[float]]], higher_is_better: bool) -> None:
    """The y range of the later part of training, where the arms cross: the first evaluations' much worse values
    would squash it. Curves that start off-range enter from the top (bottom for accuracies)."""
    xs = [x for c, _ in curves for x in c]
    if not xs:
        return
    start = min(xs) + 0.15 * (max(xs) - min(xs))
    late = [y for c, ys in curves for x, y in zip(c, ys) if x >= start]
    every = [y for _, ys in curves for y in ys]
    low, high = (min(late), max(every)) if higher_is_better else (min(every), max(late))
    pad = 0.08 * (high - low) or 0.05 * abs(high) or 0.1
    ax.set_ylim(low - pad, high + pad)


def _count_axis(ax: "Axes", xs: Sequence[float], unit: str) -> None:
    """Tokens or FLOPs on a linear axis, labelled 200k, 1.5M, 3e15: evaluations are evenly spaced in steps, and
    a log axis would squeeze the late, multi-epoch part where the crossover is."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    label = fmt_tokens if unit == "tokens" else fmt_flops
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: label(int(round(x))) if unit == "tokens" else label(x)))


def _stderr(e: "EvalEvent", metric) -> Optional[float]:
    from dlmctl.spec.crossover import metric_stderr

    return metric_stderr(e, metric.field)


def png_bytes(fig: "Figure") -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def comparison_html(report: "ComparisonReport", png: bytes, command: Sequence[str]) -> str:
    """One self-contained page: the plot (inline PNG), the tables the CLI prints, the notes and the command."""
    from .output import CROSSOVER_COLUMNS, SEED_COLUMNS, crossover_rows, report_notes, report_title, seed_rows

    esc = htmlmod.escape
    image = base64.b64encode(png).decode("ascii")
    tables = _html_table(CROSSOVER_COLUMNS, crossover_rows(report))
    if report.seeds:
        tables += f"<h2>Agreement across seeds</h2>\n{_html_table(SEED_COLUMNS, seed_rows(report))}"
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(report_title(report))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:110em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}}th{{background:#f3f3f3}}
img{{max-width:100%}}code{{background:#f3f3f3;padding:.2em .4em}}</style></head>
<body>
<h1>{esc(report_title(report))}</h1>
<p>Made by <code>{esc(shlex.join(command))}</code> at {made}.</p>
<img alt="DLM against AR per sweep point" src="data:image/png;base64,{image}">
<h2>Per sweep point</h2>
{tables}
<p>{esc(report_notes(report))}</p>
</body></html>
"""


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = htmlmod.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{esc(cell).replace(chr(10), '<br>')}</td>" for cell in row) + "</tr>"
                     for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>\n"


def write_outputs(report: "ComparisonReport", evals: Mapping[str, Sequence["EvalEvent"]], *, plot: Optional[str],
                  html: Optional[str], command: Sequence[str]) -> list[str]:
    """Draw once, write the PNG and/or the HTML page; returns the paths written."""
    fig = comparison_figure(report, evals)
    png = png_bytes(fig)
    written = []
    for option, path, data in (("--plot", plot, None), ("--html", html, "html")):
        if not path:
            continue
        try:
            if data is None:
                if Path(path).suffix.lower() not in ("", ".png"):
                    fig.savefig(path, dpi=DPI)  # another format matplotlib knows: .svg, .pdf
                else:
                    Path(path).write_bytes(png)
            else:
                Path(path).write_text(comparison_html(report, png, command), encoding="utf-8")
        except (OSError, ValueError) as err:
            raise UserError(f"{option}: cannot write {path}: {err}") from None
        written.append(path)
    return written

