"""Final weights as a Hugging Face `transformers` checkpoint, and back into dlmctl for eval and sampling.

One format for both readers. The autoregressive arm is a native `LlamaForCausalLM` (or
`Qwen3ForCausalLM` when the model has QK-norm): `AutoModelForCausalLM.from_pretrained(export)`. The
diffusion arm is the same weights with bidirectional attention, whose code (trainer/hf_modeling_dlm.py)
travels in the folder as modeling_dlm.py: `AutoModelForMaskedLM.from_pretrained(export,
trust_remote_code=True)`. `AutoTokenizer.from_pretrained(export)` reads the tokenizer. config.json's
`dlmctl` section records the arm and run; `load_export` reads the folder back into dlmctl's Transformer.

Both architectures match dlmctl's backbone exactly: RMSNorm in float32, cast back, times the weight;
rotate-half RoPE with the same inverse frequencies; SwiGLU; per-head QK-norm before RoPE (Qwen3);
grouped-query attention; no biases.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from dlmctl.spec import Arm, ModelShape, Run
from dlmctl.spec.load import SpecError

from .models import Transformer
from .tokenizer import Tokenizer

WEIGHTS, CONFIG, GENERATION_CONFIG = "model.safetensors", "config.json", "generation_config.json"
TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS = "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
DLM_CODE = "modeling_dlm.py"  # a copy of hf_modeling_dlm.py
FORMAT_VERSION = 2  # the transformers checkpoint; format 1 was dlmctl's own config.json, still read
LEGACY_FORMAT = "dlmctl-export"
TIED_HEAD = "lm_head.weight"

# model_type, the class transformers builds, and for the DLM the auto_map into modeling_dlm.py.
AR_MODELS = {False: ("llama", "LlamaForCausalLM"), True: ("qwen3", "Qwen3ForCausalLM")}
DLM_MODELS = {False: ("llama_dlm", "DlmLlamaForMaskedLM"), True: ("qwen3_dlm", "DlmQwen3ForMaskedLM")}

# dlmctl parameter names -> transformers' (Llama and Qwen3 agree; q_norm/k_norm exist with QK-norm only)
TOP_LEVEL_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "lm_head.weight": "lm_head.weight"}
BLOCK_PREFIXES = {"attn_norm.": "input_layernorm.", "mlp_norm.": "post_attention_layernorm.", "attn.": "self_attn.",
                  "mlp.": "mlp."}

OBJECTIVES = {
    Arm.autoregressive: "autoregressive: causal attention, next-token logits; log-likelihoods are exact.",
    Arm.diffusion: "masked diffusion (LLaDA-style): bidirectional attention; at each position holding "
                   "mask_token_id the logits predict the original token. Generation is iterative unmasking. A "
                   "log-likelihood from this model is an ELBO: a lower bound (estimated by Monte Carlo over "
                   "masking ratios), not the exact likelihood an AR model gives; compare perplexities as bounds.",
}


class ExportError(SpecError):
    """A folder that is not a dlmctl export, or one whose files disagree: one line naming the file."""


def hf_name(name: str) -> str:
    """dlmctl's parameter name -> the transformers Llama/Qwen3 one."""
    if name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[name]
    _, layer, rest = name.split(".", 2)  # blocks.{layer}.{rest}
    prefix = next(p for p in BLOCK_PREFIXES if rest.startswith(p))
    return f"model.layers.{layer}.{BLOCK_PREFIXES[prefix]}{rest[len(prefix):]}"


def hf_config(shape: ModelShape, arm: Arm, tokenizer: Tokenizer, dtype: torch.dtype, run: Run) -> dict:
    """config.json: the transformers keys of Llama/Qwen3 for `shape`, plus a `dlmctl` section."""
    model_type, architecture = (DLM_MODELS if arm is Arm.diffusion else AR_MODELS)[shape.qk_norm]
    eos, mask = tokenizer.eos_id, tokenizer.mask_id
    config = {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": shape.vocab_size, "hidden_size": shape.d_model, "intermediate_size": shape.d_ff,
        "num_hidden_layers": shape.n_layer, "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_kv_head, "head_dim": shape.head_dim, "hidden_act": "silu",
        "max_position_embeddings": shape.max_seq_len, "rms_norm_eps": shape.norm_eps,
        # rope_theta for transformers 4 and other readers, rope_parameters for 5; no rope_scaling: plain RoPE
        "rope_theta": shape.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "attention_bias": False, "attention_dropout": shape.attention_dropout,
        "tie_word_embeddings": shape.tie_embeddings, "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": arm is Arm.autoregressive,
        # Documents are separated by eos, never opened by a bos: eos is the bos a prompt may start with (GPT-2).
        # pad: the AR arm never trains [MASK], so it pads (a pad id's input embedding gets no gradient when
        # fine-tuned); the DLM's [MASK] is its input, so it pads with eos, as LLaDA does.
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": mask if arm is Arm.autoregressive else eos,
        "mask_token_id": mask,
    }
    if shape.qk_norm:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=shape.n_layer,
                      layer_types=["full_attention"] * shape.n_layer)
    else:
        config.update(mlp_bias=False, pretraining_tp=1)
    if arm is Arm.diffusion:
        module = Path(DLM_CODE).stem
        config["is_causal"] = False
        config["auto_map"] = {
            "AutoConfig": f"{module}.{'DlmQwen3Config' if shape.qk_norm else 'DlmLlamaConfig'}",
            "AutoModel": f"{module}.{'DlmQwen3Model' if shape.qk_norm else 'DlmLlamaModel'}",
            "AutoModelForMaskedLM": f"{module}.{architecture}",
        }
    config["dlmctl"] = {"format_version": FORMAT_VERSION, "arm": arm.value, "run": run.name,
                        "experiment": run.experiment, "mask_token_id": mask, "dropout": shape.dropout,
                        "objective": OBJECTIVES[arm]}
    return config


def unexportable(shape: ModelShape) -> Optional[str]:
    """Why a model of `shape` has no transformers export (one line naming the field), or None."""
    if shape.variant != "dense":
        return (f"spec.model.variant: {shape.variant} has no Hugging Face export (only dense maps onto Llama/Qwen3); "
                f"the run's checkpoints hold its weights")
    return None


def save_export(model: Transformer, tokenizer: Tokenizer, run: Run, dest: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    model = _unwrapped(model)
    if reason := unexportable(model.shape):
        raise ExportError(reason)
    dest.mkdir(parents=True, exist_ok=True)
    # Own contiguous copies: ZeRO keeps parameters as views into flat buffers; a tied head is stored once
    # (transformers ties it back from tie_word_embeddings).
    tensors = {hf_name(k): v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()
               if not (model.shape.tie_embeddings and k == TIED_HEAD)}
    save_file(tensors, str(dest / WEIGHTS), metadata={"format": "pt"})
    dtype = model.embed.weight.dtype
    _write_json(dest / CONFIG, hf_config(model.shape, run.arm, tokenizer, dtype, run))
    files = [WEIGHTS, CONFIG, *_save_tokenizer(tokenizer, run.arm, model.shape.max_seq_len, dest)]
    if run.arm is Arm.autoregressive:
        eos = tokenizer.eos_id
        _write_json(dest / GENERATION_CONFIG, {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": tokenizer.mask_id})
        files.append(GENERATION_CONFIG)
    else:
        shutil.copyfile(Path(__file__).with_name("hf_modeling_dlm.py"), dest / DLM_CODE)
        files.append(DLM_CODE)
    return {name: dest / name for name in files}


def _save_tokenizer(tokenizer: Tokenizer, arm: Arm, max_len: int, dest: Path) -> list[str]:
    """tokenizer.json as dlmctl uses it, and the two files that make it an AutoTokenizer with eos and mask."""
    tokenizer.save(dest / TOKENIZER)
    token = tokenizer.hf.id_to_token
    eos, mask = token(tokenizer.eos_id), token(tokenizer.mask_id)
    special = {"bos_token": eos, "eos_token": eos, "pad_token": mask if arm is Arm.autoregressive else eos,
               "mask_token": mask}
    _write_json(dest / SPECIAL_TOKENS, special)
    # split_special_tokens: text is always text, as in dlmctl ("[MASK]" typed in a prompt is not the mask).
    _write_json(dest / TOKENIZER_CONFIG, {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
        "split_special_tokens": True, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    })
    return [TOKENIZER, SPECIAL_TOKENS, TOKENIZER_CONFIG]


def shape_from_hf_config(config: dict, where: Path) -> ModelShape:
    """The ModelShape a dlmctl export's config.json describes (as dlmctl wrote it, or as transformers saved
    it again); ExportError for anything dlmctl's backbone cannot represent."""
    qk_norm = config.get("model_type") in (AR_MODELS[True][0], DLM_MODELS[True][0])
    rope = config.get("rope_parameters") or {}
    unsupported = {
        "model_type": config.get("model_type") not in {m for m, _ in (*AR_MODELS.values(), *DLM_MODELS.values())},
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(config.get("attention_bias")), "mlp_bias": bool(config.get("mlp_bias")),
        "rope_scaling": bool(config.get("rope_scaling")) or rope.get("rope_type", "default") != "default",
        "use_sliding_window": bool(config.get("use_sliding_window")),
        "head_dim": config.get("head_dim", 0) * config.get("num_attention_heads", 0) != config.get("hidden_size"),
    }
    if any(unsupported.values()):
        names = ", ".join(k for k, bad in unsupported.items() if bad)
        raise ExportError(f"{where}: {names} not supported by dlmctl's backbone")
    try:
        return ModelShape(
            n_layer=config["num_hidden_layers"], d_model=config["hidden_size"], n_head=config["num_attention_heads"],
            n_kv_head=config["num_key_value_heads"], d_ff=config["intermediate_size"], vocab_size=config["vocab_size"],
            max_seq_len=config["max_position_embeddings"], tie_embeddings=config["tie_word_embeddings"],
            qk_norm=qk_norm, rope_theta=rope.get("rope_theta") or config["rope_theta"], norm_eps=config["rms_norm_eps"],
            dropout=config["dlmctl"].get("dropout", 0.0), attention_dropout=config.get("attention_dropout", 0.0),
        )
    except KeyError as err:
        raise ExportError(f"{where}: no {err.args[0]}") from None


def load_export(folder: Path, device: str = "cpu") -> tuple[Transformer, Tokenizer, Arm]:
    """An export back into dlmctl's Transformer (the arm decides `causal`), with its tokenizer and arm.
    Also reads the folders dlmctl wrote before it wrote transformers checkpoints (format 1), so that
    `dlmctl export RUN` can rewrite them."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_config(folder)
    if config.get("format") == LEGACY_FORMAT:
        shape, arm, name = ModelShape(**config["shape"]), Arm(config["arm"]), lambda k: k
    else:
        shape, arm, name = shape_from_hf_config(config, folder / CONFIG), Arm(config["dlmctl"]["arm"]), hf_name
    if not (folder / WEIGHTS).is_file():
        raise ExportError(f"{folder}: no {WEIGHTS}")
    model = Transformer(shape)
    state = model.state_dict()
    ours = {name(k): k for k in state if not (shape.tie_embeddings and k == TIED_HEAD)}
    theirs = load_file(str(folder / WEIGHTS))
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    wrong_shape = sorted(k for k in set(ours) & set(theirs) if theirs[k].shape != state[ours[k]].shape)
    if missing or unexpected or wrong_shape:
        raise ExportError(f"{folder / WEIGHTS}: does not match {CONFIG} (missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}, wrong shape {wrong_shape[:4]})")
    model.load_state_dict({ours[k]: v for k, v in theirs.items()}, strict=False)  # a tied head is the embedding
    return model.to(device).eval(), Tokenizer.load(folder / TOKENIZER, field=str(folder / TOKENIZER)), arm


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text())
    except OSError as err:
        raise ExportError(f"{folder}: not a dlmctl export ({CONFIG}: {err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not JSON ({err})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path}: not a dlmctl export (not a JSON object)")
    section = config.get("dlmctl")
    if config.get("format") != LEGACY_FORMAT and not (isinstance(section, dict) and section.get("format_version") == FORMAT_VERSION):
        raise ExportError(f"{path}: not a dlmctl export (no dlmctl section of format_version {FORMAT_VERSION}); "
                          f"`dlmctl export RUN` writes one")
    return config


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
