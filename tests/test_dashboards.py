"""The Grafana dashboards: the chart's JSON is what `operator/dashboards.py` generates, and every PromQL
expression of every dashboard, executed by a real Prometheus that scraped a real two-arm training run and
the real operator reconciling that experiment on the test control plane, returns series with the labels
of that experiment, its runs, both arms and its sweep point."""
from __future__ import annotations

import json
import math
import os
import runpy
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client

from dlmctl.operator import dashboards
from dlmctl.operator.dashboards import ALL, DASHBOARDS, build, write
from dlmctl.spec import experiment_from_dict
from dlmctl.spec.contracts import RunPhase
from dlmctl.spec.metrics import point_label
from operator_harness import (S3_SECRET, Experiments, OperatorProcess, create_namespace_with_s3_secret,
                              install_operator_rbac, wait_until)
from prometheus_server import ScrapeTarget
from dlmctl.spec.metrics import STEP_PHASES
from testenv.cluster import free_port
from trainer_runs import TINY, events, launch, merge

EXPERIMENT = "dash"
SWEEP = {"optimizer.lr": [0.003]}  # one point, so the runs carry a non-empty `point` label
NAN_ALLOWED = {"Crossover: tokens", "Crossover: epochs"}  # NaN: no crossover (yet)


def test_the_chart_holds_exactly_the_generated_dashboards(tmp_path):
    written = write(tmp_path)
    assert sorted(p.name for p in dashboards.CHART_DASHBOARDS.glob("*.json")) == sorted(p.name for p in written)
    for path in written:
        assert path.read_text() == (dashboards.CHART_DASHBOARDS / path.name).read_text(), (
            f"{path.name} is stale: run `python -m dlmctl.operator dashboards`")


def test_the_json_queries_are_the_ones_the_tests_execute():
    for dashboard in DASHBOARDS:
        model = build(dashboard)
        assert model["uid"] == dashboard.uid and model["time"] == {"from": "now-6h", "to": "now"}
        in_json = [(p["title"], t["expr"], t.get("legendFormat", "")) for p in model["panels"] for t in p["targets"]]
        assert in_json == [(p.title, q.expr, q.legend) for p in dashboard.panels for q in p.queries]
        variables = {v["name"]: v["query"]["query"] for v in model["templating"]["list"] if v["type"] == "query"}
        assert variables == {v.name: v.query for v in dashboard.variables}
        assert [a["expr"] for a in model["annotations"].get("list", [])] == [q.expr for _, q in dashboard.annotations]


# ---- a real run, scraped -------------------------------------------------------------------------------------


def experiment_spec(s3_uri: str, endpoint: str) -> dict:
    return {"arms": ["diffusion", "autoregressive"], "sweep": SWEEP, **merge(TINY, {
        "eval": {"interval_steps": 8},
        "resources": {"nodes": 1, "gpus_per_node": 1, "cpu": "1", "memory": "2Gi"},
        "checkpoint": {"uri": s3_uri, "endpoint_url": endpoint, "credentials_secret": S3_SECRET},
        "metrics": {"port": 9400, "log_interval_steps": 1}})}


@pytest.fixture(scope="module")
def observed(cluster, s3_server, prometheus, tmp_path_factory):
    """An Experiment on the test control plane reconciled by the operator process, its two runs trained by
    the real trainer here (writing to the experiment's S3 store, as its pods would), all scraped every second.
    Yields what the queries must find and the window to run them over."""
    workdir = tmp_path_factory.mktemp("dashboards")
    namespace = f"dash-{uuid.uuid4().hex[:6]}"
    s3_uri = f"s3://{s3_server.bucket}/dashboards-{uuid.uuid4().hex[:8]}"
    spec = experiment_spec(s3_uri, s3_server.endpoint_url)
    runs = experiment_from_dict({"metadata": {"name": EXPERIMENT}, "spec": spec}).runs()
    operator = OperatorProcess(install_operator_rbac(cluster), workdir / "operator.log", env=s3_server.env())
    ports = {run.name: free_port() for run in runs}
    prometheus.add_targets(
        ScrapeTarget("dlmctl-operator", f"127.0.0.1:{operator.metrics_port}", {"namespace": "dlmctl-system"},
                     honor_labels=True),
        *(ScrapeTarget("dlmctl-trainer", f"127.0.0.1:{port}", {"namespace": namespace}) for port in ports.values()))
    start = time.time()
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        create_namespace_with_s3_secret(core, namespace, s3_server)
        experiments = Experiments(api, namespace)
        operator.start()
        try:
            experiments.create(EXPERIMENT, spec)
            env = {**s3_server.env(), "DLMCTL_METRICS_ADDR": "127.0.0.1", "DLMCTL_PEAK_FLOPS": "1e11",
                   "DLMCTL_HOME": str(workdir / "home"),
                   "DLMCTL_CACHE": os.environ.get("DLMCTL_TEST_CACHE", str(workdir / "cache"))}
            trainers = []
            for run in runs:  # as the run's pod would: its spec, its own metrics port on loopback
                local = run.model_copy(update={"spec": run.spec.model_copy(update={
                    "metrics": run.spec.metrics.model_copy(update={"port": ports[run.name]})})})
                trainers.append(launch(local, workdir / run.name, env=env, wait=False))
            for run, trainer in zip(runs, trainers):
                code = trainer.wait(timeout=300)
                assert code == 0, (workdir / f"{run.name}.log").read_text()[-4000:]
            trained = time.time()
            # the operator has read both runs' progress from the store and says so
            selector = f'{{namespace="{namespace}",experiment="{EXPERIMENT}"}}'
            prometheus.wait_for(f"count(dlm_experiment_crossover_tokens{selector}) >= 1", check=operator.check_alive)
            prometheus.wait_for(f'sum(dlm_operator_runs{selector}) == {len(runs)}', check=operator.check_alive)
            time.sleep(2)
            values = {"namespace": namespace, "experiment": EXPERIMENT, "run": [r.name for r in runs]}
            end = time.time()
            if os.environ.get("DLMCTL_DASHBOARD_PNGS"):  # docs/dashboards/*.png, from this very run
                render = runpy.run_path(str(Path(__file__).parent.parent / "docs" / "dashboards" / "render.py"))
                render["render_all"](prometheus.url, values, start, end, Path(os.environ["DLMCTL_DASHBOARD_PNGS"]))
            yield {"prometheus": prometheus, "workdir": workdir, "start": start, "end": end, "trained": trained,
                   "namespace": namespace, "runs": runs, "values": values}
        finally:
            operator.stop()
            core.delete_namespace(namespace)
            core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)


def range_result(observed, expr: str) -> list[dict]:
    return observed["prometheus"].query_range(expr, observed["start"], observed["end"], step=1)


def finite(series: dict) -> list[float]:
    return [float(v) for _, v in series["values"] if math.isfinite(float(v))]


@pytest.mark.cluster
@pytest.mark.s3
def test_every_variable_lists_the_experiment_and_its_runs(observed):
    prom, values = observed["prometheus"], observed["values"]
    for dashboard in DASHBOARDS:
        for variable in dashboard.variables:
            selector = dashboards.substitute(variable.selector, values)
            found = prom.label_values(variable.label, selector)
            wanted = values[variable.name]
            assert set([wanted] if isinstance(wanted, str) else wanted) <= set(found), (dashboard.uid, variable)


CASES = [(d, i) for d in DASHBOARDS for i in range(len(dashboards.queries(d, {"namespace": "n", "experiment": "e",
                                                                                  "run": ALL})))]


@pytest.mark.cluster
@pytest.mark.s3
@pytest.mark.parametrize("dashboard,index", CASES, ids=[
    f"{d.uid.removeprefix('dlmctl-')}-{dashboards.queries(d, {'namespace': 'n', 'experiment': 'e', 'run': ALL})[i][0]}"
    for d, i in CASES])
def test_every_query_returns_the_runs_series(observed, dashboard, index):
    title, query = dashboards.queries(dashboard, observed["values"], rate_interval="10s")[index]
    result = range_result(observed, query.expr)
    if title.startswith("annotation: Crossover"):  # marks exactly the sweep points with a crossover
        crossovers = range_result(observed, query.expr.split(" > ")[0])
        assert crossovers, "the operator exports the crossover gauge of every sweep point"
        found = {s["metric"]["point"] for s in crossovers if any(v > 0 for v in finite(s))}
        assert {s["metric"]["point"] for s in result} == found
        return
    assert result, f"{title}: no series for {query.expr}"
    runs = observed["runs"]
    labels = [s["metric"] for s in result]
    for label in query.labels:
        assert all(label in m for m in labels), f"{title}: a series without `{label}`: {labels}"
    expected = {"run": {r.name for r in runs}, "arm": {r.arm.value for r in runs},
                "point": {point_label(r.point) for r in runs},
                "phase": set(STEP_PHASES) if title == "Step time by phase" else {p.value for p in RunPhase}}
    for label in query.labels:  # every run (both arms, the sweep point) present, and nothing else
        found = {m[label] for m in labels}
        if title == "Runs by phase":
            assert found <= expected[label], f"{title}: {found}"
        else:
            assert found == expected[label], f"{title}: {label} {found} != {expected[label]}"
    for m in labels:
        if "namespace" in m and "experiment" in m:
            assert (m["namespace"], m["experiment"]) == (observed["namespace"], EXPERIMENT)
    if title not in NAN_ALLOWED:
        for series in result:
            assert finite(series), f"{title}: only NaN for {series['metric']}"


@pytest.mark.cluster
@pytest.mark.s3
def test_the_dlm_vs_ar_panel_shows_both_arms_and_their_evaluations(observed):
    title, query = dashboards.queries(DASHBOARDS[0], observed["values"])[0]
    result = range_result(observed, query.expr)
    assert sorted(s["metric"]["arm"] for s in result) == ["autoregressive", "diffusion"], title
    for series in result:
        evaluations = events(observed["workdir"] / series["metric"]["run"], "eval")
        assert len(evaluations) >= 2
        shown = set(finite(series))
        assert shown and shown <= {e["val_loss"] for e in evaluations}, "the panel shows the run's evaluations"


@pytest.mark.cluster
@pytest.mark.s3
def test_the_platform_counts_the_experiments_runs_and_gpus(observed):
    values = observed["values"]
    platform = DASHBOARDS[1]
    by_title = {}
    for title, query in dashboards.queries(platform, values, rate_interval="10s"):
        by_title.setdefault(title, []).append(range_result(observed, query.expr))
    runs_by_phase = by_title["Runs by phase"][0]
    at_end = sum(float(s["values"][-1][1]) for s in runs_by_phase)
    assert at_end == len(observed["runs"])
    requested, allocated = (max(finite(r[0])) for r in by_title["GPUs requested vs allocated"])
    assert requested == allocated == len(observed["runs"]), "one GPU per run, each bound on a KWOK node"
