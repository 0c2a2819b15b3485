"""Run-level entry points above the library modules: the model a run trains, its final export, and what
`dlmctl sample` and `dlmctl export` do with a run folder (run.json, tokenizer.json, checkpoints, export/).
`train` (loop.py) sits above this module; nothing below imports either."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from dlmctl.spec import Run
from dlmctl.spec.sections import Arm

from .checkpoint_store import CheckpointStore
from .export import load_export, save_export
from .models import Transformer, build
from .sample import generate
from .tokenizer import Tokenizer
from .training_state import DS_TAG, run_store_uri
from .transfer import write_export


def build_model(run: Run, vocab_size: int) -> Transformer:
    shape = run.spec.model.resolve(vocab_size=_round_up(vocab_size, 64), max_seq_len=run.spec.data.seq_len)
    torch.manual_seed(run.spec.seed)  # identical initial weights on every rank and every world size
    return build(shape)


def export_final(run: Run, model, data, store: Optional[CheckpointStore], output: Path) -> str:
    """Final weights to `<run dir>/export` and, for a remote checkpoint URI, to `<uri>/export/`."""
    files = save_export(model, data.tokenizer, run, output / "export")
    if store and not store.location.is_local:
        return write_export(store.uri, files, endpoint_url=run.spec.checkpoint.endpoint_url)
    return str(output / "export")


def load_weights_from_latest(run: Run, output: Path):
    """The model and tokenizer of a run's export, else of its newest verified checkpoint, outside any
    training job."""
    if (output / "export" / "config.json").exists():
        model, tokenizer, _ = load_export(output / "export")
        return model, tokenizer
    store = CheckpointStore(run_store_uri(run, output), endpoint_url=run.spec.checkpoint.endpoint_url,
                            keep_last=run.spec.checkpoint.keep_last, registry=None)
    with tempfile.TemporaryDirectory() as tmp, store:
        found = store.restore_latest(tmp)
        if not found:
            raise FileNotFoundError(f"{store.uri}: no verified checkpoint yet")
        tokenizer = Tokenizer.load(output / "tokenizer.json")
        model = build_model(run, tokenizer.vocab_size)
        states = torch.load(next((found[1] / DS_TAG).glob("mp_rank_00_model_states.pt")), weights_only=False)
        model.load_state_dict(states["module"])
    return model.eval(), tokenizer


def sample_run(run_dir, prompt: str, *, max_new_tokens: int = 64, steps: int | None = None,
               temperature: float = 0.0, seed: int = 0) -> str:
    """`dlmctl sample RUN --prompt ...`: continue `prompt` with the newest checkpoint (or export) of a
    local run folder. DLM: one block, `steps` denoising steps (default one per token)."""
    run = _read_run(run_dir)
    model, tokenizer = load_weights_from_latest(run, Path(run_dir))
    ids = tokenizer.encode(prompt)
    if not ids and run.arm is Arm.autoregressive:
        ids = [tokenizer.eos_id]
    new = generate(model, run.arm, ids, gen_length=max_new_tokens, mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id,
                   steps=steps, temperature=temperature, seed=seed)
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)


def export_run(run_dir: Path, output: Optional[str] = None) -> str:
    """`dlmctl export RUN`: the newest verified checkpoint of a run, as an export at `output`
    (a folder or s3:// URI; default `<checkpoint uri>/export/`)."""
    run = _read_run(run_dir)
    model, tokenizer = load_weights_from_latest(run, Path(run_dir))
    with tempfile.TemporaryDirectory() as tmp:
        files = save_export(model, tokenizer, run, Path(tmp))
        if output and "://" not in output:
            Path(output).mkdir(parents=True, exist_ok=True)
            for name, path in files.items():
                shutil.copyfile(path, Path(output) / name)
            return str(Path(output).resolve())
        target = output or run_store_uri(run, Path(run_dir))
        return write_export(target, files, endpoint_url=run.spec.checkpoint.endpoint_url)


def _read_run(run_dir) -> Run:
    return Run.model_validate_json((Path(run_dir) / "run.json").read_text())


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
