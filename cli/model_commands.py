"""sample, export: use a trained run. The work is the trainer's (dlmctl.trainer.runs),
imported only when the command runs, so the CLI installs and starts without torch.

Contract with the trainer:
    dlmctl.trainer.runs.sample_run(run_dir, prompt, *, max_new_tokens, steps, temperature, seed) -> str
    dlmctl.trainer.runs.export_run(run_dir, output) -> where it was written
where run_dir is the run's output folder (run.json, metrics.jsonl, checkpoints).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import UserError
from .run_commands import backend, backend_options

app = typer.Typer()

RunArg = Annotated[str, typer.Argument(metavar="RUN", help="a run name (dlmctl get NAME lists them) or its output folder")]


def trainer_function(function: str) -> Any:
    """The trainer's run-level entry point (dlmctl.trainer.runs), or one clear line saying what is missing."""
    full = "dlmctl.trainer.runs"
    try:
        mod = importlib.import_module(full)
    except ModuleNotFoundError as err:
        if err.name in (full, "dlmctl.trainer"):
            raise UserError(f"this dlmctl has no {full}; install the trainer: pip install 'dlmctl[train]'") from None
        raise UserError(f"{full} needs {err.name}, which is not installed; pip install 'dlmctl[train]'") from None
    fn = getattr(mod, function, None)
    if fn is None:
        raise UserError(f"this dlmctl's trainer has no {full}.{function}; it cannot {function.removesuffix('_run')} yet")
    return fn


def run_dir(ctx: typer.Context, run: str) -> Path:
    path = Path(run)
    if path.is_dir():
        return path
    return Path(backend(ctx).artifacts(run))


@app.command()
@backend_options
def sample(
    ctx: typer.Context,
    run: RunArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option(min=1, max=65536, help="tokens to generate")] = 64,
    steps: Annotated[Optional[int], typer.Option(min=1, help="DLM denoising steps (default: one per token)")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Generate a continuation of PROMPT with a trained run's latest checkpoint."""
    fn = trainer_function("sample_run")
    text = fn(run_dir(ctx, run), prompt, max_new_tokens=max_new_tokens, steps=steps, temperature=temperature, seed=seed)
    typer.echo(text)


@app.command()
@backend_options
def export(
    ctx: typer.Context,
    run: RunArg,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="a folder, or an s3:// URI (written to <URI>/export/); default: <checkpoint uri>/export/"
    )] = None,
) -> None:
    """Export a trained run's newest verified checkpoint as a Hugging Face transformers checkpoint: AR as Llama
    (Qwen3 with QK-norm) for AutoModelForCausalLM, DLM with its bidirectional code for AutoModelForMaskedLM
    (trust_remote_code=True); safetensors, config.json and the tokenizer for AutoTokenizer."""
    fn = trainer_function("export_run")
    written = fn(run_dir(ctx, run), output)
    typer.echo(f"exported {run} to {written}")
