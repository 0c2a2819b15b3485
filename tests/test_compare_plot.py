"""`dlmctl compare --plot/--html`: one panel per sweep point in a grid (rows: budgets, columns: the other swept
keys), each arm's curve drawn from its evaluations with the standard errors as error bars, each best point and
the crossover marked, seeds as separate lines; the HTML page embeds the image and the table's numbers. The
figure's data is checked against the input curves, not its pixels."""
from __future__ import annotations

import base64
import math
import struct
from html.parser import HTMLParser

import pytest
from cli_runs import run

pytest.importorskip("matplotlib")

from dlmctl.cli import plots, run_commands  # noqa: E402
from dlmctl.cli.backends.base import Comparison  # noqa: E402
from dlmctl.spec import ExperimentStatus, RunStatus, experiment_from_dict  # noqa: E402
from dlmctl.spec.comparison import Arm, Axis, Metric, compare  # noqa: E402
from dlmctl.spec.contracts import EvalEvent  # noqa: E402

BUDGETS, EPOCHS = [4096, 8192], [2, 4, 8]


def experiment(sweep):
    exp = experiment_from_dict({
        "apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "scarce"},
        "spec": {"model": {"preset": "nano"}, "data": {"unique_tokens": 4096, "seq_len": 64, "epochs": 2},
                 "sweep": sweep}})
    runs = [RunStatus(name=r.name, arm=r.arm, phase="Succeeded") for r in exp.runs()]
    return exp.model_copy(update={"status": ExperimentStatus(runs=runs)})


def curve(run, n=8):
    """A run's evaluations; its numbers depend on its budget, epochs, seed and arm so that no two runs share a
    curve. AR overfits after its third evaluation; the DLM keeps improving and passes it."""
    u, epochs, seed = run.point.get("data.unique_tokens", 4096), run.point.get("data.epochs", 2), run.point.get(
        "seed", 0)
    out = []
    for i in range(n):
        tokens = u * epochs * (i + 1) // n
        if run.arm is Arm.autoregressive:
            loss = 3.0 + abs(i - 3) * 0.2 + u / 1e5
        else:
            loss = 4.5 - 0.25 * i + epochs / 100 + seed / 50
        out.append(EvalEvent(event="eval", time=float(i), step=i + 1, total_steps=n, epoch=epochs * (i + 1) / n,
                             tokens=tokens, val_loss=loss, val_loss_stderr=0.01 * (i + 1),
                             flops=6.0 * tokens, choice_accuracy=0.25 + 0.05 * i))
    return out


def figure_for(sweep, **kw):
    exp = experiment(sweep)
    evals = {r.name: curve(r) for r in exp.runs()}
    report = compare(exp, evals, **kw)
    return exp, evals, report, plots.comparison_figure(report, evals)


def flops_text(flops: float) -> str:
    """Two significant digits, the exponent without padding: 43008 -> 4.3e4."""
    exponent = math.floor(math.log10(flops))
    return f"{round(flops / 10 ** exponent, 1):g}e{exponent}"


def lines_by_gid(fig):
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


def test_one_panel_per_sweep_point_rows_are_budgets_columns_are_epochs():
    exp, _, report, fig = figure_for({"data.epochs": EPOCHS, "data.unique_tokens": BUDGETS})
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(BUDGETS) * len(EPOCHS)
    grid = fig.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (len(BUDGETS), len(EPOCHS))
    for ax in visible:
        spec = ax.get_subplotspec()
        row, col = spec.rowspan.start, spec.colspan.start
        assert ax.get_title() == f"data.epochs={EPOCHS[col]}, data.unique_tokens={BUDGETS[row]}"
        assert ax.get_xlabel() == "tokens seen" and ax.get_ylabel() == "validation loss (nats/token)"


def test_each_arms_curve_is_its_evaluations_with_stderr_bars_and_its_best_marked():
    exp, evals, report, fig = figure_for({"data.unique_tokens": BUDGETS})
    lines = lines_by_gid(fig)
    for run in exp.runs():
        events = evals[run.name]
        line = lines[run.name]
        assert list(line.get_xdata()) == [e.tokens for e in events]
        assert list(line.get_ydata()) == [e.val_loss for e in events]
        best = min(events, key=lambda e: e.val_loss)
        star = lines[f"{run.name}:best"]
        assert (list(star.get_xdata()), list(star.get_ydata())) == ([best.tokens], [best.val_loss])
        assert star.get_marker() == "*"
        # the error bars: one vertical segment per evaluation, value ± its standard error
        ax = line.axes
        (bars,) = [c for c in ax.containers if c.lines[0] is line]
        segments = bars.lines[2][0].get_segments()
        for segment, e in zip(segments, events):
            (x0, y0), (x1, y1) = segment
            assert x0 == x1 == e.tokens
            assert (y0, y1) == pytest.approx((e.val_loss - e.val_loss_stderr, e.val_loss + e.val_loss_stderr))
    both = {line.get_color() for line in (lines[r.name] for r in exp.runs())}
    assert len(both) == 2, "one colour per arm"


def test_the_crossover_is_a_vertical_line_at_its_position_on_the_axis_with_a_note():
    for by, attr in ((Axis.tokens, "tokens"), (Axis.epochs, "epoch"), (Axis.flops, "flops")):
        exp, _, report, fig = figure_for({"data.unique_tokens": BUDGETS}, by=by)
        lines = lines_by_gid(fig)
        for p in report.points:
            assert p.crossover is not None
            vline = lines[f"{p.runs['diffusion']}:crossover"]
            assert list(vline.get_xdata()) == [getattr(p.crossover, attr)] * 2
            c = p.crossover
            flops = f"{flops_text(c.flops)} FLOPs, " if by is Axis.flops else ""
            note = f"crossover at {flops}{c.tokens / 1000:.3g}k tokens, epoch {c.epoch:.2f}\nmargin {c.margin:.3f}"
            assert any(t.get_text().startswith(note) for t in vline.axes.texts), note


def test_without_a_crossover_nothing_is_marked():
    exp = experiment({})
    evals = {r.name: curve(r) for r in exp.runs()}
    dlm = exp.runs()[0].name
    evals[dlm] = [e.model_copy(update={"val_loss": 9.0}) for e in evals[dlm]]  # always far behind
    report = compare(exp, evals)
    fig = plots.comparison_figure(report, evals)
    assert report.points[0].crossover is None
    assert not [g for g in lines_by_gid(fig) if g.endswith(":crossover")]


def test_seeds_are_separate_lines_in_their_points_panel():
    exp, evals, report, fig = figure_for({"data.unique_tokens": BUDGETS, "seed": [1, 2, 3]})
    assert len([ax for ax in fig.axes if ax.get_visible()]) == len(BUDGETS)
    lines = lines_by_gid(fig)
    for budget in BUDGETS:
        seeds = [r for r in exp.runs() if r.point["data.unique_tokens"] == budget]
        axes = {lines[r.name].axes for r in seeds}
        assert len(axes) == 1 and len(seeds) == 6, "three seeds of both arms in one panel"
        for r in seeds:
            assert list(lines[r.name].get_ydata()) == [e.val_loss for e in evals[r.name]]
        (panel,) = axes
        assert any(t.get_text().startswith("3/3 seeds cross over") for t in panel.texts)


def test_a_missing_arm_is_noted_in_its_panel():
    exp = experiment({})
    dlm = next(r for r in exp.runs() if r.arm is Arm.diffusion)
    evals = {dlm.name: curve(dlm)}
    fig = plots.comparison_figure(compare(exp, evals), evals)
    assert [t.get_text() for t in fig.axes[0].texts] == ["AR: no evaluations"]


def test_choice_accuracy_is_plotted_as_measured():
    exp, evals, report, fig = figure_for({}, metric=Metric.choice_acc)
    run = exp.runs()[0]
    line = lines_by_gid(fig)[run.name]
    assert list(line.get_ydata()) == [e.choice_accuracy for e in evals[run.name]]
    assert line.axes.get_ylabel() == "choice accuracy"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


class FakeBackend:
    def __init__(self, comparison):
        self.comparison = comparison

    def compare(self, name):
        return self.comparison


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.code, self._in, self.text = [], [], [], None, []

    def handle_starttag(self, tag, attrs):
        if tag == "br" and self._in == "td":
            self.cells[-1] += "\n"
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in = tag if tag in ("td", "code") else self._in
        if tag == "td":
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in == "td":
            self.cells[-1] += data
        elif self._in == "code":
            self.code.append(data)


def test_plot_and_html_from_the_command(capsys, monkeypatch, tmp_path):
    exp = experiment({"data.epochs": EPOCHS, "data.unique_tokens": BUDGETS})
    evals = {r.name: curve(r) for r in exp.runs()}
    monkeypatch.setattr(run_commands, "backend", lambda ctx: FakeBackend(Comparison(exp, evals)))
    png, page = tmp_path / "scarce.png", tmp_path / "scarce.html"
    code, out, err = run(capsys, "compare", "scarce", "--plot", png, "--html", page, "--by", "epochs")
    assert code == 0, err
    assert err.splitlines() == [f"wrote {png}", f"wrote {page}"]
    width, height = png_size(png.read_bytes())
    assert (width, height) == (round(len(EPOCHS) * plots.PANEL_INCHES[0] * plots.DPI),
                               round((len(BUDGETS) * plots.PANEL_INCHES[1] + plots.HEADER_INCHES) * plots.DPI))

    parsed = Page()
    parsed.feed(page.read_text())
    (src,) = parsed.images
    assert src.startswith("data:image/png;base64,")
    assert png_size(base64.b64decode(src.removeprefix("data:image/png;base64,"))) == (width, height)
    report = compare(exp, evals, by=Axis.epochs)
    first = report.points[0]
    best = first.dlm.best
    assert f"{best.value:.3f} ± {best.stderr:.3f}\n{best.tokens / 1000:.3g}k tokens, epoch {best.epoch:.2f}" \
        in parsed.cells
    c = first.crossover
    assert any(cell.startswith(f"at {c.tokens / 1000:.3g}k tokens, epoch {c.epoch:.2f},\n{flops_text(c.flops)} FLOPs")
               for cell in parsed.cells), parsed.cells
    assert parsed.code == ["dlmctl compare scarce --metric val_loss --by epochs"]
    assert "an upper bound on its NLL" in "".join(parsed.text)


def test_an_unwritable_plot_path_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    exp = experiment({})
    monkeypatch.setattr(run_commands, "backend", lambda ctx: FakeBackend(Comparison(exp, {})))
    code, _, err = run(capsys, "compare", "scarce", "--plot", tmp_path / "missing" / "x.png")
    assert code == 2 and err.startswith(f"error: --plot: cannot write {tmp_path / 'missing' / 'x.png'}")
    assert err.count("\n") == 1
