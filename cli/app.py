"""The `dlmctl` command: the root Typer app, the verb groups merged into it, and `main()`.

Start-up stays light: nothing here imports pydantic, torch, kubernetes or kubeflow; each command
imports what it needs when it runs. `main()` turns every user error into one line on stderr and
exit code 2 -- never a traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from . import config_commands, model_commands, run_commands, spec_commands
from .errors import USER_ERROR_EXIT, is_user_error, one_line

app = typer.Typer(
    name="dlmctl",
    help="Train diffusion and autoregressive language models side by side, locally or on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(spec_commands.app)
app.add_typer(run_commands.app)
app.add_typer(model_commands.app)
app.add_typer(config_commands.app, name="config")


def version() -> str:
    from dlmctl.spec.sections import package_version

    return package_version() or "0+unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dlmctl {version()}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    backend: Annotated[Optional[str], typer.Option(
        "--backend", help=f"{run_commands.BACKEND_HELP}; also $DLMCTL_BACKEND")] = None,
    context: Annotated[Optional[str], typer.Option("--context", help=run_commands.CONTEXT_HELP)] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n", help=run_commands.NAMESPACE_HELP)] = None,
    server: Annotated[Optional[str], typer.Option("--server", help=run_commands.SERVER_HELP)] = None,
    show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    # The commands that use a backend accept these options after their name too (run_commands.backend_options).
    ctx.obj = {"backend": backend, "context": context, "namespace": namespace, "server": server}


def main(argv: Optional[list[str]] = None) -> int:
    usage = _click_exceptions()
    try:
        result = app(args=argv, prog_name="dlmctl", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as done:
        return done.exit_code
    except usage.UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # plain `dlmctl`: the help, not an error
            typer.echo(err.format_message())
            return 0
        hint = f" (see `{err.ctx.command_path} --help`)" if getattr(err, "ctx", None) is not None else ""
        return _fail(err.format_message().replace("Value error, ", "") + hint, USER_ERROR_EXIT)
    except usage.ClickException as err:
        return _fail(err.format_message(), err.exit_code)
    except (typer.Abort, getattr(usage, "Abort", typer.Abort), KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dlmctl render ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        if is_user_error(err):
            return _fail(err, USER_ERROR_EXIT)
        if _debugging():
            raise
        return _fail(f"internal error: {type(err).__name__}: {err} (DLMCTL_DEBUG=1 shows the traceback)", 1)


def _debugging() -> bool:
    from dlmctl.spec.settings import ClientSettings, read

    try:
        return read(ClientSettings).debugging
    except Exception:  # a bad value of another knob must not hide the error being reported
        return False


def _click_exceptions():
    """Typer >= 0.2x vendors click as typer._click; older releases use click itself."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _fail(message: object, code: int) -> int:
    print(f"error: {one_line(message)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
