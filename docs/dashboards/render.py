"""Plot every panel of the dlmctl Grafana dashboards from a Prometheus, without Grafana: one PNG per dashboard
(`<out>/experiment.png`, `<out>/platform.png`), a subplot per panel titled like the panel, each query run
as the panel runs it (`dlmctl.operator.dashboards.queries`, the variables filled in).

    python docs/dashboards/render.py --prometheus http://127.0.0.1:9090 --namespace lab --experiment dash \\
        --start 1767000000 --end 1767000300 --out docs/dashboards

Time panels are drawn against seconds since `--start`; XY panels x = their second query (tokens or epochs),
y = their first, one line per run, with the experiment's crossover (the "Crossover: tokens/epochs" panels)
as dashed vertical lines; stat panels as labelled bars of the last value ("none yet" for NaN). The crossover
annotation shades the time panels red wherever the operator reported a crossover.
tests/test_dashboards.py calls `render` on its Prometheus when DLMCTL_DASHBOARD_PNGS names a folder.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import urllib.parse
import urllib.request
from pathlib import Path

from dlmctl.operator.dashboards import DASHBOARDS, Dashboard, queries


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise ValueError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"{{\s*(\w+)\s*}}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def points(series: dict) -> list[tuple[float, float]]:
    return [(float(t), float(v)) for t, v in series["values"]]


def render(dashboard: Dashboard, url: str, values: dict, start: float, end: float, out: Path,
           step: float = 1.0, rate_interval: str = "10s") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}  # panel title -> [(query, result)]
    for title, query in queries(dashboard, values, rate_interval):
        results.setdefault(title, []).append((query, query_range(url, query.expr, start, end, step)))
    crossover_at = sorted({t for _, result in results.get("annotation: Crossover found", []) for s in result
                           for t, v in points(s)})  # the annotation: a region while the operator reports one
    columns = 2
    rows = math.ceil(len(dashboard.panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 3.4 * rows), squeeze=False)
    fig.suptitle(f"{dashboard.title}  (namespace {values.get('namespace')}"
                 + (f", experiment {values['experiment']}" if "experiment" in values else "") + ")", fontsize=14)
    for ax, panel in zip(axes.flat, dashboard.panels):
        drawn = results[panel.title]
        ax.set_title(panel.title, fontsize=11)
        ax.grid(alpha=0.3)
        if panel.kind == "xy":
            (ys_query, ys), (_, xs) = drawn
            x_by_run = {s["metric"].get("run"): dict(points(s)) for s in xs}
            for s in ys:
                xmap = x_by_run.get(s["metric"].get("run"), {})
                pairs = sorted({(xmap[t], v) for t, v in points(s) if t in xmap and math.isfinite(xmap[t])
                                and math.isfinite(v)})
                ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", markersize=3,
                        label=legend(ys_query.legend, s["metric"]))
            for q, result in results.get(f"Crossover: {panel.x_label}", []):
                for s in result:
                    last = points(s)[-1][1]
                    if math.isfinite(last):
                        ax.axvline(last, color="red", linestyle="--", label=f"crossover {s['metric'].get('point', '')}")
            ax.set_xlabel(panel.x_label)
            ax.set_ylabel("nats/token")
        elif panel.kind == "stat":
            labels, heights, texts = [], [], []
            for query, result in drawn:
                for s in result:
                    last = points(s)[-1][1] if s["values"] else math.nan
                    labels.append(legend(query.legend, s["metric"]))
                    heights.append(last if math.isfinite(last) else 0.0)
                    texts.append(f"{last:.4g}" if math.isfinite(last) else "none yet")
            bars = ax.bar(range(len(labels)), heights, color="tab:purple")
            for bar, text in zip(bars, texts):
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=10)
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_yticks([])
        else:
            for query, result in drawn:
                for s in result:
                    ts = [(t - start, v) for t, v in points(s)]
                    ax.plot([p[0] for p in ts], [p[1] for p in ts], label=legend(query.legend, s["metric"]))
            for i, t in enumerate(crossover_at):
                ax.axvspan(t - start - step / 2, t - start + step / 2, color="red", alpha=0.15, linewidth=0,
                           label="crossover reported" if i == 0 else None)
            ax.set_xlabel("seconds")
        if panel.unit not in ("short", ""):
            ax.set_ylabel({"percentunit": "fraction", "reqps": "per second"}.get(panel.unit, panel.unit))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best", ncol=2 if len(ax.get_legend_handles_labels()[0]) > 4 else 1)
    for ax in list(axes.flat)[len(dashboard.panels):]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.mkdir(parents=True, exist_ok=True)
    path = out / dashboard.file_name.replace(".json", ".png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def render_all(url: str, values: dict, start: float, end: float, out: Path, **kwargs) -> list[Path]:
    return [render(d, url, {k: v for k, v in values.items() if k in {x.name for x in d.variables}}, start, end, out,
                   **kwargs) for d in DASHBOARDS]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--run", action="append", help="runs to show (default: all)")
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--end", type=float, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args(argv)
    values = {"namespace": args.namespace, "experiment": args.experiment, "run": args.run or ".*"}
    for path in render_all(args.prometheus, values, args.start, args.end, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
