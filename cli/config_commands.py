"""dlmctl config: named contexts (local, a kubeconfig context, an API service) in the config file
(cli/contexts.py). A token is read from standard input, never from the command line, and never printed."""
from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Named contexts: where commands go and with which token (the dlmctl config file).",
                  no_args_is_help=True)

ContextArg = Annotated[str, typer.Argument(metavar="NAME", help="the context's name")]


class BackendName(str, Enum):
    local = "local"
    kubernetes = "kubernetes"
    service = "service"


@app.command("set-context")
def set_context(
    name: ContextArg,
    backend: Annotated[Optional[BackendName], typer.Option(
        "--backend", help="local, kubernetes or service (default: the existing context's)")] = None,
    server: Annotated[Optional[str], typer.Option("--server", help="the service's URL (service)")] = None,
    namespace: Annotated[Optional[str], typer.Option(
        "--namespace", "-n", help="the namespace (kubernetes, service)")] = None,
    kube_context: Annotated[Optional[str], typer.Option(
        "--kube-context", help="the kubeconfig context (kubernetes; default: kubeconfig's current)")] = None,
    ca_file: Annotated[Optional[str], typer.Option(
        "--ca-file", help="a PEM bundle of the CAs to trust for the server's certificate (service)")] = None,
) -> None:
    """Create a context, or change the settings given of an existing one (its token is kept)."""
    from dataclasses import replace
    from pathlib import Path

    from . import contexts
    from .errors import UserError

    config = contexts.load()
    old = config.contexts.get(name)
    existed = old is not None
    if old is None and backend is None:
        raise UserError(f"--backend: context {name!r} is new; say which backend it uses (local, kubernetes or service)")
    chosen = backend.value if backend else old.backend
    if old is not None and old.backend != chosen:
        old = None  # another backend: nothing of the old context carries over, its token least of all
    given = {"server": server, "namespace": namespace, "kube_context": kube_context, "ca_file": ca_file}
    allowed = {"local": set(), "kubernetes": {"namespace", "kube_context"},
               "service": {"server", "namespace", "ca_file"}}[chosen]
    wrong = [k for k, v in given.items() if v is not None and k not in allowed]
    if wrong:
        raise UserError(f"--{wrong[0].replace('_', '-')}: a {chosen} context has no such setting")
    if server is not None:
        from .backends.service import normalize_server

        server = normalize_server(server)
    if ca_file is not None:
        path = Path(ca_file).expanduser()
        if not path.is_file():
            raise UserError(f"--ca-file: {ca_file} is not a file")
        ca_file = str(path.resolve())
    updates = {k: v for k, v in {**given, "server": server, "ca_file": ca_file}.items() if v is not None}
    context = replace(old, **updates) if old else contexts.Context(backend=chosen, **updates)
    if old is not None and context.server != old.server:
        context = replace(context, token=None)  # a token is for the server it was set for
    if chosen == "service" and not context.server:
        raise UserError("--server: a service context needs the service's URL (https://…)")
    config.contexts[name] = context
    if config.current is None:
        config.current = name
    path = contexts.save(config)
    note = " (the current context)" if config.current == name else f" (use it with `dlmctl config use-context {name}`)"
    typer.echo(f"context {name} {'changed' if existed else 'created'} in {path}{note}")


@app.command("set-token")
def set_token(name: ContextArg) -> None:
    """Store the token of a service context, read from standard input (never from the command line):
    `dlmctl config set-token NAME < token-file`, or type it at the prompt."""
    from dataclasses import replace
    from getpass import getpass

    from . import contexts
    from .errors import UserError

    config = contexts.load()
    context = config.context(name)
    if context.backend != "service":
        raise UserError(f"context {name!r} uses the {context.backend} backend; only a service context has a token")
    token = (getpass(f"token for {context.server}: ") if sys.stdin.isatty() else sys.stdin.read()).strip()
    if not token or any(c.isspace() for c in token):
        raise UserError("the token read from standard input is empty or has spaces inside; give it alone")
    config.contexts[name] = replace(context, token=token)
    path = contexts.save(config)
    typer.echo(f"token of context {name} stored in {path}")


@app.command("use-context")
def use_context(name: ContextArg) -> None:
    """Make a context the current one: where commands go when no --backend, --context or --server says."""
    from . import contexts

    config = contexts.load()
    config.context(name)
    config.current = name
    contexts.save(config)
    typer.echo(f"current context: {name}")


@app.command("current-context")
def current_context() -> None:
    """Print the current context's name."""
    from . import contexts
    from .errors import UserError

    config = contexts.load()
    if config.current is None:
        raise UserError(f"no current context in {contexts.config_path()}; choose one with `dlmctl config use-context`")
    typer.echo(config.current)


@app.command("get-contexts")
def get_contexts() -> None:
    """List the contexts (whether each has a token, never the token)."""
    from rich.table import Table

    from . import contexts
    from .output import console

    config = contexts.load()
    if not config.contexts:
        console.print(f"no contexts in {contexts.config_path()}; create one with `dlmctl config set-context`")
        return
    table = Table(box=None, pad_edge=False)
    for col in ("CURRENT", "NAME", "BACKEND", "SERVER", "NAMESPACE", "TOKEN"):
        table.add_column(col)
    for name, c in sorted(config.contexts.items()):
        where = c.server or (f"kubeconfig context {c.kube_context}" if c.kube_context else "")
        token = ("set" if c.token else "-") if c.backend == "service" else ""
        table.add_row("*" if name == config.current else "", name, c.backend, where or "-", c.namespace or "-", token)
    console.print(table)


@app.command("delete-context")
def delete_context(name: ContextArg) -> None:
    """Delete a context and its token."""
    from . import contexts

    config = contexts.load()
    config.context(name)
    del config.contexts[name]
    if config.current == name:
        config.current = None
    contexts.save(config)
    typer.echo(f"context {name} deleted" + (" (there is no current context now)" if config.current is None else ""))
