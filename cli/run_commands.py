"""submit, list, get, logs, cancel, compare: experiments on a backend."""
from __future__ import annotations

import os
import sys
import time
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from .backends import Backend

app = typer.Typer()

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="the experiment's metadata.name")]
TERMINAL = ("Succeeded", "Failed", "Cancelled")


class GetFormat(str, Enum):
    table = "table"
    yaml = "yaml"
    json = "json"


def backend(ctx: typer.Context) -> "Backend":
    from .backends import get_backend

    return get_backend((ctx.obj or {}).get("backend"))


@app.command()
def submit(
    ctx: typer.Context,
    spec: Annotated[str, typer.Argument(metavar="SPEC", help="the experiment YAML file, or - for standard input")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="follow progress, then print the comparison")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="replace an experiment of the same name")] = False,
) -> None:
    """Start every run of an experiment (validated first; nothing is created on error)."""
    from .output import console
    from .specfile import load

    experiment = load(spec)  # before the backend is touched: a bad spec leaves no trace
    target = backend(ctx)
    names = target.submit(experiment, replace=replace)
    name = experiment.metadata.name
    console.print(f"experiment {name}: {len(names)} runs submitted to the {target.name} backend: {', '.join(names)}")
    if wait:
        raise typer.Exit(follow(target, name))
    console.print(f"follow it with `dlmctl get {name}`, `dlmctl logs {name} -f` or `dlmctl compare {name}`")


def follow(target: "Backend", name: str) -> int:
    """One line whenever a run moves on; at the end the comparison table. 0 only if every run succeeded."""
    from .output import comparison_table, console, progress_line

    interval = float(os.environ.get("DLMCTL_WATCH_INTERVAL", "1"))
    seen: dict[str, tuple] = {}
    try:
        while True:
            experiment = target.get(name)
            for run in experiment.status.runs:
                key = (run.phase, run.step, run.val_loss)
                if seen.get(run.name) != key:
                    seen[run.name] = key
                    print(progress_line(run), flush=True)
            if experiment.status.phase in TERMINAL:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        print(f"stopped following; {name} keeps running (dlmctl logs {name} -f, dlmctl cancel {name})", file=sys.stderr)
        return 130
    console.print(comparison_table(experiment))
    if experiment.status.phase != "Succeeded":
        print(f"experiment {name} {experiment.status.phase.lower()}: "
              f"{experiment.status.progress} runs succeeded (dlmctl logs {name} --run RUN)", file=sys.stderr)
        return 1
    return 0


@app.command("list")
def list_(
    ctx: typer.Context,
    output: Annotated[GetFormat, typer.Option("--output", "-o", help="table, yaml or json")] = GetFormat.table,
) -> None:
    """List experiments."""
    from dataclasses import asdict

    from .output import console, dump, summaries_table

    summaries = backend(ctx).list()
    if output is GetFormat.table:
        if summaries:
            console.print(summaries_table(summaries))
        else:
            console.print("no experiments yet; start one with `dlmctl submit SPEC`")
        return
    rows = [{**asdict(s), "created": s.created.isoformat() if s.created else None} for s in summaries]
    typer.echo(dump(rows, output.value))


@app.command()
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
def cancel(ctx: typer.Context, name: NameArg) -> None:
    """Stop every unfinished run of an experiment."""
    from .output import console

    target = backend(ctx)
    phase = target.get(name).status.phase
    if phase in TERMINAL:
        console.print(f"experiment {name} already finished ({phase})")
        return
    target.cancel(name)
    console.print(f"experiment {name} cancelled")


@app.command()
def compare(ctx: typer.Context, name: NameArg) -> None:
    """The comparison table: per run its arm, train and validation loss, tokens seen, epochs, wall time."""
    from .output import comparison_table, console

    console.print(comparison_table(backend(ctx).get(name)))
