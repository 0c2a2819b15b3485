"""submit, list, get, logs, cancel, compare: experiments on a backend."""
from __future__ import annotations

import functools
import inspect
import sys
import time
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

if TYPE_CHECKING:
    from .backends import Backend

app = typer.Typer()

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="the experiment's metadata.name")]

BACKEND_HELP = "local, kubernetes or service (default: the current context's, else a configured cluster, else local)"
CONTEXT_HELP = ("a context of `dlmctl config get-contexts`, else a kubeconfig context (which implies --backend "
                "kubernetes); default: the current context")
NAMESPACE_HELP = ("the Kubernetes namespace (default: the context's, else default); with no backend or context "
                  "chosen, implies --backend kubernetes")
SERVER_HELP = "the dlmctl API service's URL; implies --backend service (the token: $DLMCTL_TOKEN or the context's)"
# The same options as the root's, accepted after the command's name as well: `dlmctl submit x.yaml --backend
# kubernetes`. $DLMCTL_BACKEND is read by `get_backend`, below what the command line chooses.
TARGET_OPTIONS = {
    "backend": Annotated[Optional[str], typer.Option("--backend", help=BACKEND_HELP)],
    "context": Annotated[Optional[str], typer.Option("--context", help=CONTEXT_HELP)],
    "namespace": Annotated[Optional[str], typer.Option("--namespace", "-n", help=NAMESPACE_HELP)],
    "server": Annotated[Optional[str], typer.Option("--server", help=SERVER_HELP)],
}


def backend_options(command: Callable) -> Callable:
    """Give a command --backend, --context, --namespace/-n and --server, so that they work after its name as they do
    before it; what is given here overrides the root's (in `ctx.obj`, which `backend(ctx)` reads)."""
    signature = inspect.signature(command, eval_str=True)
    names = {f"target_{key}": key for key in TARGET_OPTIONS}
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=TARGET_OPTIONS[key])
             for name, key in names.items()]

    @functools.wraps(command)
    def with_target(*args, **kwargs):
        chosen = {key: kwargs.pop(name, None) for name, key in names.items()}
        ctx = kwargs.get("ctx") or next(a for a in args if isinstance(a, typer.Context))
        ctx.obj = {**(ctx.obj or {}), **{k: v for k, v in chosen.items() if v is not None}}
        return command(*args, **kwargs)

    with_target.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    with_target.__annotations__ = {p.name: p.annotation for p in with_target.__signature__.parameters.values()}
    return with_target


class GetFormat(str, Enum):
    table = "table"
    yaml = "yaml"
    json = "json"


def backend(ctx: typer.Context) -> "Backend":
    from .backends import get_backend

    chosen = ctx.obj or {}
    return get_backend(chosen.get("backend"), context=chosen.get("context"), namespace=chosen.get("namespace"),
                       server=chosen.get("server"))


@app.command()
@backend_options
def submit(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="the experiment YAML file, or - for standard input")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="follow progress, then print the comparison")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="replace an experiment of the same name")] = False,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="start every run over at step 0 (by default a run resumes from its newest checkpoint)")] = False,
) -> None:
    """Start every run of an experiment (validated first; nothing is created on error)."""
    from .output import console
    from .specfile import load

    experiment = load(spec)  # before the backend is touched: a bad spec leaves no trace
    target = backend(ctx)
    name = experiment.metadata.name
    console.print(f"submitting experiment {name} to {target.where(experiment)}")
    names = target.submit(experiment, replace=replace, fresh=fresh)
    console.print(f"experiment {name}: {len(names)} runs submitted: {', '.join(names)}")
    if wait:
        raise typer.Exit(follow(target, name))
    console.print(f"follow it with `dlmctl get {name}`, `dlmctl logs {name} -f` or `dlmctl compare {name}`")


def follow(target: "Backend", name: str) -> int:
    """One line whenever a run moves on; at the end the comparison table. 0 only if every run succeeded."""
    from dlmctl.spec.contracts import is_terminal
    from dlmctl.spec.settings import ClientSettings, read

    from .output import print_comparison, progress_line

    interval = read(ClientSettings).watch_interval
    seen: dict[str, tuple] = {}
    try:
        while True:
            experiment = target.get(name)
            for run in experiment.status.runs:
                key = (run.phase, run.step, run.val_loss)
                if seen.get(run.name) != key:
                    seen[run.name] = key
                    print(progress_line(run), flush=True)
            if is_terminal(experiment.status.phase):
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        print(f"stopped following; {name} keeps running (dlmctl logs {name} -f, dlmctl cancel {name})", file=sys.stderr)
        return 130
    print_comparison(target.compare(name))
    if experiment.status.phase != "Succeeded":
        print(f"experiment {name} {experiment.status.phase.lower()}: "
              f"{experiment.status.progress} runs succeeded (dlmctl logs {name} --run RUN)", file=sys.stderr)
        return 1
    return 0


@app.command("list")
@backend_options
def list_(
    ctx: typer.Context,
    output: Annotated[GetFormat, typer.Option("--output", "-o", help="table, yaml or json")] = GetFormat.table,
    all_namespaces: Annotated[bool, typer.Option(
        "--all-namespaces", "-A", help="every namespace of the cluster (kubernetes backend)")] = False,
) -> None:
    """List experiments."""
    from dataclasses import asdict

    from .errors import UserError
    from .output import console, dump, summaries_table

    target = backend(ctx)
    if all_namespaces and not target.namespaced:
        raise UserError(f"--all-namespaces: the {target.name} backend has no namespaces")
    summaries = target.list(all_namespaces=True) if all_namespaces else target.list()
    if output is GetFormat.table:
        if summaries:
            console.print(summaries_table(summaries, namespaces=all_namespaces))
        else:
            console.print("no experiments yet; start one with `dlmctl submit SPEC`")
        return
    rows = [{**asdict(s), "created": s.created.isoformat() if s.created else None} for s in summaries]
    typer.echo(dump(rows, output.value))


@app.command()
@backend_options
def get(
    ctx: typer.Context,
    name: NameArg,
    output: Annotated[GetFormat, typer.Option("--output", "-o", help="table, yaml or json")] = GetFormat.table,
) -> None:
    """Show an experiment and the state of its runs."""
    from .output import console, dump, status_table

    experiment = backend(ctx).get(name)
    if output is GetFormat.table:
        console.print(status_table(experiment))
    else:
        typer.echo(dump(experiment.model_dump(mode="json"), output.value), nl=output is GetFormat.json)


@app.command()
@backend_options
def logs(
    ctx: typer.Context,
    name: NameArg,
    run: Annotated[Optional[str], typer.Option("--run", "-r", help="one run (default: all, prefixed)")] = None,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the runs finish")] = False,
) -> None:
    """Print the training logs of an experiment's runs."""
    try:
        for line in backend(ctx).logs(name, run=run, follow=follow_):
            sys.stdout.write(line + "\n")
            if follow_:
                sys.stdout.flush()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
@backend_options
def cancel(ctx: typer.Context, name: NameArg) -> None:
    """Stop every unfinished run of an experiment (their checkpoints are kept)."""
    from dlmctl.spec.contracts import is_terminal

    from .output import console

    from .backends.local_state import CorruptState

    target = backend(ctx)
    try:
        phase = target.get(name).status.phase
    except CorruptState:  # a damaged state file must not keep its processes running
        phase = None
    if phase is not None and is_terminal(phase):
        console.print(f"experiment {name} already finished ({phase})")
        return
    target.cancel(name)
    console.print(f"experiment {name} cancelled")


class CompareMetric(str, Enum):  # spec.comparison.Metric's values (pydantic stays out of start-up)
    val_loss = "val_loss"
    val_bpb = "val_bpb"
    choice_acc = "choice_acc"


class CompareAxis(str, Enum):  # spec.comparison.Axis's values
    tokens = "tokens"
    epochs = "epochs"
    flops = "flops"


@app.command()
@backend_options
def compare(
    ctx: typer.Context,
    name: NameArg,
    metric: Annotated[CompareMetric, typer.Option(
        "--metric", help="val_loss (nats/token), val_bpb (bits per byte) or choice_acc (higher is better)")
    ] = CompareMetric.val_loss,
    by: Annotated[CompareAxis, typer.Option(
        "--by", help="align the arms' evaluations by tokens seen, epochs or training FLOPs")] = CompareAxis.tokens,
    output: Annotated[GetFormat, typer.Option(
        "--output", "-o", help="table, or json/yaml (spec.comparison.ComparisonReport) for scripts")
    ] = GetFormat.table,
    plot: Annotated[Optional[str], typer.Option(
        "--plot", metavar="FILE.png", help="draw DLM against AR per sweep point (needs matplotlib)")] = None,
    html: Annotated[Optional[str], typer.Option(
        "--html", metavar="FILE.html", help="one self-contained page: the plot, the tables, the command")] = None,
) -> None:
    """Per run: its arm, train and validation loss, tokens seen, epochs, wall time; per sweep point: each arm's
    best and last value (± s.e.) and where, choice accuracy, whether AR overfits, and where the DLM crosses
    over (with its margin in standard errors), and whether the seeds agree when the sweep sweeps `seed`."""
    if plot or html:
        from .plots import require_matplotlib

        require_matplotlib("--plot" if plot else "--html")
    from dlmctl.spec.comparison import compare as build_report

    from .output import dump, print_comparison

    comparison = backend(ctx).compare(name)
    report = build_report(comparison.experiment, comparison.evals, metric.value, by.value)
    if output is GetFormat.table:
        print_comparison(comparison, report=report)
    else:
        typer.echo(dump(report.model_dump(mode="json"), output.value), nl=output is GetFormat.json)
    if plot or html:
        from .plots import write_outputs

        command = ["dlmctl", "compare", name, "--metric", metric.value, "--by", by.value]
        for key, value in (ctx.obj or {}).items():
            if value is not None:
                command += [f"--{key}", str(value)]
        for path in write_outputs(report, comparison.evals, plot=plot, html=html, command=command):
            sys.stdout.flush()  # the tables first, then where the files went
            print(f"wrote {path}", file=sys.stderr)
