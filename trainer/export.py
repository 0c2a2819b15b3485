"""Final weights as safetensors + config.json + tokenizer.json, loadable back for eval and sampling."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from dlmctl.spec import Arm, ModelShape, Run

from .model import Transformer
from .tokenizer import Tokenizer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
TIED_HEAD = "lm_head.weight"


def save_export(model: Transformer, tokenizer: Tokenizer, run: Run, dest: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    model = _unwrapped(model)
    # Own contiguous copies: ZeRO keeps parameters as views into flat buffers, and a tied head is stored once.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()
               if not (model.shape.tie_embeddings and k == TIED_HEAD)}
    save_file(tensors, str(dest / WEIGHTS), metadata={"format": "pt"})
    config = {"format": "dlmctl-export", "version": 1, "arm": run.arm.value, "run": run.name,
              "experiment": run.experiment, "shape": model.shape.model_dump(), "mask_id": tokenizer.mask_id,
              "eos_id": tokenizer.eos_id}
    (dest / CONFIG).write_text(json.dumps(config, indent=2))
    tokenizer.save(dest / TOKENIZER)
    return {name: dest / name for name in (WEIGHTS, CONFIG, TOKENIZER)}


def load_export(folder: Path, device: str = "cpu") -> tuple[Transformer, Tokenizer, Arm]:
    from safetensors.torch import load_file

    config = json.loads((folder / CONFIG).read_text())
    model = Transformer(ModelShape(**config["shape"]))
    tensors = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - ({TIED_HEAD} if model.shape.tie_embeddings else set()):
        raise ValueError(f"{folder / WEIGHTS}: does not match config.json (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval(), Tokenizer.load(folder / TOKENIZER), Arm(config["arm"])


def export_run(run_dir: Path, output: Optional[str] = None) -> str:
    """`dlmctl export RUN`: the newest verified checkpoint of a run, as an export at `output`
    (a folder or s3:// URI; default `<checkpoint uri>/export/`)."""
    from .checkpointing import load_weights_from_latest, run_store_uri
    from .checkpoints import write_export

    run = Run.model_validate_json((Path(run_dir) / "run.json").read_text())
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


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
