"""validate, render, schema, crd, docs: what a spec means, without running anything."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer()

SpecArg = Annotated[str, typer.Argument(metavar="SPEC", help="the experiment YAML file, or - for standard input")]


class Format(str, Enum):
    yaml = "yaml"
    json = "json"


FormatOpt = Annotated[Format, typer.Option("--output", "-o", help="yaml or json")]


@app.command()
def validate(spec: SpecArg) -> None:
    """Check a spec and show the runs it expands into."""
    from .output import console, runs_plan_table
    from .specfile import load

    experiment = load(spec)
    runs = experiment.runs()
    console.print(runs_plan_table(experiment, runs))
    console.print(f"{spec}: valid, {len(runs)} run{'s' * (len(runs) != 1)}")


@app.command()
def render(spec: SpecArg, output: FormatOpt = Format.yaml) -> None:
    """Print the Kubernetes objects `submit` would create on a cluster: data-preparation Jobs, then one PyTorchJob per run."""
    from dlmctl.operator.jobs import to_yaml
    from dlmctl.operator.render import job_manifests
    from dlmctl.spec.redact import redact

    from .output import dump
    from .specfile import load

    documents = redact(job_manifests(load(spec)))  # a valid spec holds no secrets; printed objects never do
    if output is Format.json:
        typer.echo(dump({"apiVersion": "v1", "kind": "List", "items": documents}, "json"))
    else:
        typer.echo(to_yaml(documents), nl=False)


@app.command()
def schema() -> None:
    """Print the Experiment JSON Schema (for editors and linters)."""
    from dlmctl.spec.crd import json_schema_text

    typer.echo(json_schema_text(), nl=False)


@app.command()
def crd(output: FormatOpt = Format.yaml) -> None:
    """Print the Experiment CustomResourceDefinition (charts/dlmctl/crds/ holds this output)."""
    from dlmctl.spec import crd as crd_module

    if output is Format.json:
        from .output import dump

        typer.echo(dump(crd_module.crd(), "json"))
    else:
        typer.echo(crd_module.crd_yaml(), nl=False)


@app.command()
def docs(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write here instead of printing")] = None,
    check: Annotated[bool, typer.Option("--check", help="exit 1 if --output is not up to date")] = False,
) -> None:
    """Print (or write) the spec reference in Markdown, generated from the models."""
    from dlmctl.spec.docs import reference_markdown

    text = reference_markdown()
    if output is None:
        typer.echo(text, nl=False)
        return
    if check:
        current = output.read_text() if output.is_file() else None
        if current != text:
            typer.echo(f"{output} is out of date; run `dlmctl docs -o {output}`", err=True)
            raise typer.Exit(1)
        return
    output.write_text(text)
