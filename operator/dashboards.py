"""The Grafana dashboards, built with grafana-foundation-sdk from the metric catalogue (`spec/metrics.py`).

`DASHBOARDS` describes them as data: every panel's PromQL, legend and unit, every variable's label
lookup, every annotation. `build` turns one into Grafana's dashboard model through the SDK's builders,
`write` stores them as stable JSON (sorted keys, fixed uids, no timestamps) where the Helm chart
templates them into ConfigMaps, and `queries` gives every expression with the variables filled in, for
tests and for `docs/dashboards/render.py`, which plot them without Grafana.

Grafana's time-series panels take time as their x axis. "Validation loss against tokens/epochs" are XY
charts instead: each run's validation loss (`dlm_validation_loss`) and, sampled at the same scrapes, the
tokens at which it was measured (`dlm_validation_tokens`) or those tokens in epochs, are fetched as tables,
merged on time and labels, split into one frame per run, and plotted x = tokens (epochs), y = loss.
The crossover that `compare` defines (`spec/crossover.py`) is what the operator exports as
`dlm_experiment_crossover_tokens/epochs`: it is shown per sweep point next to those charts and marked on
the time axes by an annotation wherever the operator reports one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

from dlmctl.spec import metrics as m

CHART_DASHBOARDS = Path(__file__).resolve().parent.parent / "charts" / "dlmctl" / "dashboards"
DATASOURCE = "${datasource}"
RATE_INTERVAL = "$__rate_interval"
ALL = ".*"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""  # Grafana's legend format; every label it names is one every returned series carries
    table: bool = False  # fetched as a table (the XY charts' input)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(re.findall(r"{{\s*(\w+)\s*}}", self.legend))


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries, stat or xy
    queries: tuple[Query, ...]
    description: str
    unit: str = "short"
    stacked: bool = False
    x_label: str = ""  # xy: what its x axis shows (the second query's values)


@dataclass(frozen=True)
class Variable:
    """A dashboard variable: the values of `label` on the series `selector` finds (Grafana's label_values)."""
    name: str
    label: str
    selector: str
    multi: bool = False

    @property
    def query(self) -> str:
        return f"label_values({self.selector}, {self.label})"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    panels: tuple[Panel, ...]
    annotations: tuple[tuple[str, Query], ...] = field(default=())

    @property
    def file_name(self) -> str:
        return f"{self.uid.removeprefix('dlmctl-')}.json"


def _sel(*labels: str) -> str:
    return "{" + ",".join(f'{label}=~"${label}"' for label in labels) + "}"


RUN = _sel("namespace", "experiment", "run")  # a run's series, as the variables choose them
EXPERIMENT = _sel("namespace", "experiment")
BY_RUN = "run, arm, point"
LEGEND = "{{arm}} {{point}}"


def _rate(metric: str, selector: str = RUN) -> str:
    return f"rate({metric}{selector}[{RATE_INTERVAL}])"


def experiment_dashboard() -> Dashboard:
    # A run's validation gauges read NaN until its first evaluation (and 0 from a trainer older than that
    # rule); a loss is never 0 nats, so `> 0` keeps exactly the measured values.
    validation_loss = f"{m.VALIDATION_LOSS.series}{RUN} > 0"
    loss = Query(validation_loss, "{{run}}", table=True)
    validation_tokens = f"{m.VALIDATION_TOKENS.series}{RUN} and {validation_loss}"
    epochs_at_validation = (f"({validation_tokens}) / ({m.TRAIN_TOKENS.series}{RUN} / "
                            f"({m.EPOCH.series}{RUN} > 0))")
    crossover = f"{m.CROSSOVER_TOKENS.series}{EXPERIMENT} > 0"  # NaN (none yet) compares false
    panels = (
        Panel("Validation loss: DLM vs AR", "timeseries", (Query(validation_loss, LEGEND),),
              "Validation loss per arm and sweep point (nats/token): AR's NLL, the DLM's ELBO (an upper bound "
              "on its NLL)"),
        Panel("Validation loss against tokens", "xy",
              (loss, Query(validation_tokens, "{{run}}", table=True)),
              "Each run's validation loss against the training tokens seen when it was measured", x_label="tokens"),
        Panel("Validation loss against epochs", "xy", (loss, Query(epochs_at_validation, "{{run}}", table=True)),
              "Each run's validation loss against epochs over its unique tokens when it was measured",
              x_label="epochs"),
        Panel("Crossover: tokens", "stat", (Query(f"{m.CROSSOVER_TOKENS.series}{EXPERIMENT}", "{{point}}"),),
              "Training tokens at which the DLM overtakes AR's best validation loss so far, per sweep point "
              "(spec/crossover.py, as `dlmctl compare` finds it); none yet: NaN"),
        Panel("Crossover: epochs", "stat", (Query(f"{m.CROSSOVER_EPOCHS.series}{EXPERIMENT}", "{{point}}"),),
              "Epochs at that crossover, per sweep point"),
        Panel("Choice accuracy", "timeseries", (Query(f"{m.CHOICE_ACCURACY.series}{RUN}", LEGEND),),
              "Continuation-choice accuracy at the last evaluation", unit="percentunit"),
        Panel("Training loss", "timeseries", (Query(f"{m.TRAIN_LOSS.series}{RUN}", LEGEND),),
              "Training loss of the last step (nats/token)"),
        Panel("Tokens/s", "timeseries", (Query(f"{m.TOKENS_PER_SECOND.series}{RUN}", LEGEND),),
              "Training throughput over the last logging interval"),
        Panel("MFU", "timeseries", (Query(f"{m.MFU.series}{RUN}", LEGEND),),
              "Model FLOPs utilisation over the last logging interval", unit="percentunit"),
        Panel("Epoch progress", "timeseries",
              (Query(f"{m.EPOCH.series}{RUN} / {m.PLANNED_EPOCHS.series}{RUN}", LEGEND),),
              "Epochs so far over the epochs the run will make", unit="percentunit"),
        Panel("Step time by phase", "timeseries",
              (Query(f"sum by ({BY_RUN}, phase) ({_rate(m.STEP_PHASE_SECONDS.series)}) / ignoring(phase) "
                     f"group_left sum by ({BY_RUN}) ({_rate(m.TRAIN_STEPS.series)})", LEGEND + " {{phase}}"),),
              "Seconds per optimizer step spent in each phase: " + ", ".join(m.STEP_PHASES), unit="s", stacked=True),
        Panel("Restarts", "timeseries", (Query(f"{m.RUN_RESTARTS.series}{RUN}", LEGEND),),
              "Times the operator restarted each run (preemptions included)"),
        Panel("Checkpoint age", "timeseries",
              (Query(f"time() - ({m.CHECKPOINT_LAST_SUCCESS.series}{RUN} > 0)", LEGEND),),
              "Seconds since the run's last checkpoint whose manifest was written", unit="s"),
        Panel("Checkpoint upload lag", "timeseries",
              (Query(f"sum by ({BY_RUN}) ({_rate(m.CHECKPOINT_SAVE_DURATION.sum_series())}) / "
                     f"sum by ({BY_RUN}) ({_rate(m.CHECKPOINT_SAVE_DURATION.series)})", LEGEND),),
              "Mean seconds from a checkpoint's commit to its manifest being written", unit="s"),
    )
    variables = (
        Variable("namespace", "namespace", m.RUN_INFO.series),
        Variable("experiment", "experiment", f'{m.RUN_INFO.series}{{namespace=~"$namespace"}}'),
        Variable("run", "run", f"{m.RUN_INFO.series}{EXPERIMENT}", multi=True),
    )
    return Dashboard("dlmctl-experiment", "dlmctl / Experiment",
                     "DLM vs AR on one experiment: validation loss against time, tokens and epochs per sweep point, "
                     "the crossover, and the runs' throughput, progress and checkpoints",
                     variables, panels, (("Crossover found", Query(crossover, "crossover {{point}}")),))


def platform_dashboard() -> Dashboard:
    latency = m.RECONCILE_DURATION.bucket_series()
    selected = '{namespace=~"$namespace"}'
    panels = (
        Panel("Reconcile rate", "timeseries",
              (Query(f"sum(rate({m.RECONCILE_DURATION.series}[{RATE_INTERVAL}]))", "reconciles/s"),),
              "Reconciles of experiments per second, all operator replicas", unit="reqps"),
        Panel("Reconcile errors", "timeseries",
              (Query(f"sum(rate({m.RECONCILE_ERRORS.series}[{RATE_INTERVAL}]))", "errors/s"),),
              "Reconciles that raised, per second", unit="reqps"),
        Panel("Reconcile latency", "timeseries", tuple(
            Query(f"histogram_quantile({q}, sum by (le) (rate({latency}[{RATE_INTERVAL}])))", f"p{round(q * 100)}")
            for q in (0.5, 0.9, 0.99)), "Quantiles of one reconcile's wall time", unit="s"),
        Panel("Runs by phase", "timeseries", (Query(f"sum by (phase) ({m.RUNS.series}{selected})", "{{phase}}"),),
              "Runs of the selected namespaces' experiments in each phase", stacked=True),
        Panel("GPUs requested vs allocated", "timeseries", (
            Query(f"sum({m.GPUS_REQUESTED.series}{selected})", "requested"),
            Query(f"sum({m.GPUS_ALLOCATED.series}{selected})", "allocated")),
              "GPUs the unfinished runs ask for, and those held by pods bound to a node"),
        Panel("Jobs and runs", "timeseries", tuple(
            Query(f"sum(increase({metric.series}[{RATE_INTERVAL}]))", legend) for metric, legend in (
                (m.JOBS_CREATED, "jobs created"), (m.JOBS_RECREATED, "jobs recreated"),
                (m.RUNS_PREEMPTED, "runs preempted"), (m.RUNS_FAILED, "runs failed"))),
              "PyTorchJobs created and recreated, runs preempted and failed for good"),
    )
    variables = (Variable("namespace", "namespace", m.RUNS.series, multi=True),)
    return Dashboard("dlmctl-platform", "dlmctl / Platform",
                     "The dlmctl operator: reconcile rate, errors and latency, runs by phase, GPUs", variables, panels)


DASHBOARDS = (experiment_dashboard(), platform_dashboard())


# ---- the same dashboards as Grafana's JSON model -----------------------------------------------------------


def build(dashboard: Dashboard) -> dict:
    """Grafana's dashboard model of `dashboard`, through the SDK's builders."""
    from grafana_foundation_sdk.builders import dashboard as gd, prometheus, stat, timeseries, xychart
    from grafana_foundation_sdk.builders.common import ReduceDataOptions, StackingConfig, VizLegendOptions
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common, dashboard as model, prometheus as prom, xychart as xy

    source = model.DataSourceRef(type_val="prometheus", uid=DATASOURCE)
    builder = (gd.Dashboard(dashboard.title).uid(dashboard.uid).description(dashboard.description)
               .tags(["dlmctl"]).time("now-6h", "now").refresh("30s").timezone("browser").editable()
               .tooltip(model.DashboardCursorSync.CROSSHAIR)
               .with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus")))
    for variable in dashboard.variables:
        builder = builder.with_variable(
            gd.QueryVariable(variable.name).label(variable.name).datasource(source)
            .query({"query": variable.query, "refId": "PrometheusVariableQueryEditor-VariableQuery"})
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(model.VariableSort.ALPHABETICAL_ASC)
            .multi(variable.multi).include_all(variable.multi).all_value(ALL if variable.multi else ""))
    for name, query in dashboard.annotations:
        builder = builder.annotation(gd.AnnotationQuery().name(name).datasource(source).enable(True)
                                     .icon_color("red").expr(query.expr))
    for index, panel in enumerate(dashboard.panels):
        if panel.kind == "timeseries":
            p = (timeseries.Panel().line_width(2).fill_opacity(10 if panel.stacked else 0).show_points(
                common.VisibilityMode.NEVER).legend(VizLegendOptions().show_legend(True).display_mode(
                    common.LegendDisplayMode.LIST).placement(common.LegendPlacement.BOTTOM)))
            if panel.stacked:
                p = p.stacking(StackingConfig().mode(common.StackingMode.NORMAL))
        elif panel.kind == "stat":
            p = (stat.Panel().reduce_options(ReduceDataOptions().calcs(["last"]).values(False)).graph_mode(common.BigValueGraphMode.NONE).text_mode(common.BigValueTextMode.VALUE_AND_NAME)
                 .mappings([model.SpecialValueMap(options=model.DashboardSpecialValueMapOptions(
                     match=model.SpecialValueMatch.NA_N, result=model.ValueMappingResult(text="none yet")))]))
        else:  # xy: tables merged on time and labels, one frame per run, x = the second query's value
            p = (xychart.Panel().mapping(xy.SeriesMapping.AUTO).series([
                xychart.XYSeriesConfig().x(xychart.XychartXYSeriesConfigX().matcher(
                    xychart.MatcherConfig().id("byName").options("Value #B"))).y(
                    xychart.XychartXYSeriesConfigY().matcher(
                        xychart.MatcherConfig().id("byName").options("Value #A")))])
                 .legend(VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                         .placement(common.LegendPlacement.BOTTOM))
                 .with_transformation(model.DataTransformerConfig(id_val="merge", options={}))
                 .with_transformation(model.DataTransformerConfig(
                     id_val="partitionByValues", options={"fields": ["run"], "keepFields": False}))
                 .axis_label(panel.x_label))
        p = (p.title(panel.title).description(panel.description).unit(panel.unit).datasource(source)
             .grid_pos(model.GridPos(h=8, w=12, x=12 * (index % 2), y=8 * (index // 2))))
        for ref, query in zip("ABCDEFGH", panel.queries):
            target = prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref).datasource(source)
            if query.table:
                target = target.format(prom.PromQueryFormat.TABLE)
            p = p.with_target(target.instant() if panel.kind == "stat" else target.range())
        builder = builder.with_panel(p.id(index + 1))
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def render_json(dashboard: Dashboard) -> str:
    return json.dumps(build(dashboard), sort_keys=True, indent=2) + "\n"


def write(out: Path = CHART_DASHBOARDS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for dashboard in DASHBOARDS:
        path = out / dashboard.file_name
        path.write_text(render_json(dashboard))
        paths.append(path)
    return paths


# ---- every expression, with the variables filled in ------------------------------------------------------


Values = Mapping[str, Union[str, Sequence[str]]]


def substitute(expr: str, values: Values, rate_interval: str = "1m") -> str:
    """`expr` with `$name` replaced as Grafana does in a regex matcher: one value escaped, several as `(a|b)`,
    "all" (`ALL`) as is; `$__rate_interval` as `rate_interval`."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name == "__rate_interval":
            return rate_interval
        v = values[name]
        if v == ALL:
            return ALL
        if isinstance(v, str):
            return _regex_escape(v)
        return "(" + "|".join(_regex_escape(x) for x in v) + ")"

    return re.sub(r"\$(\w+)", value, expr)


def _regex_escape(value: str) -> str:
    """A value as Grafana's Prometheus data source puts it into a regex matcher (in a PromQL string)."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def queries(dashboard: Dashboard, values: Values, rate_interval: str = "1m") -> list[tuple[str, Query]]:
    """(panel title, query with its expression concrete) for every panel query and annotation of `dashboard`."""
    out = [(panel.title, Query(substitute(q.expr, values, rate_interval), q.legend, q.table))
           for panel in dashboard.panels for q in panel.queries]
    out += [(f"annotation: {name}", Query(substitute(q.expr, values, rate_interval), q.legend))
            for name, q in dashboard.annotations]
    return out
