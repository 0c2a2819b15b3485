"""`dlmctl export` writes a Hugging Face `transformers` checkpoint. The autoregressive arm is a native
Llama (Qwen3 with QK-norm) for AutoModelForCausalLM; the diffusion arm is the same weights with
bidirectional attention, its code shipped in the folder, for AutoModelForMaskedLM with
trust_remote_code. The oracle throughout is dlmctl's own Transformer and samplers on the exported model."""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer,
                          LlamaForCausalLM, Qwen3ForCausalLM)

from trainer_runs import tiny_run

from dlmctl.spec.load import SpecError
from dlmctl.trainer.export import ExportError, load_export, save_export
from dlmctl.trainer.runs import build_model
from dlmctl.trainer.sample import ar_generate, dlm_generate
from dlmctl.trainer.tokenizer import Tokenizer

SHAPE = {"preset": None, "n_layer": 2, "d_model": 32, "n_head": 4, "n_kv_head": 2, "d_ff": 64, "rope_theta": 500.0,
         "norm_eps": 1e-6}
VARIANTS = [pytest.param(qk_norm, tied, id=f"{'qk_norm' if qk_norm else 'plain'}-{'tied' if tied else 'untied'}")
            for qk_norm in (False, True) for tied in (True, False)]
TOLERANCE = 1e-4


def scramble(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, norms included: with all-ones norms a swapped or dropped norm weight would
    not change the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 else 0.3 * noise)


def exported(tmp_path, arm, qk_norm=False, tied=True, tokenizer=None, dtype=torch.float32):
    run = tiny_run(arm, model={**SHAPE, "qk_norm": qk_norm, "tie_embeddings": tied})
    tokenizer = tokenizer or Tokenizer.byte()
    model = build_model(run, tokenizer.vocab_size)
    scramble(model)
    model = model.to(dtype).eval()
    save_export(model, tokenizer, run, tmp_path / "export")
    return model, tokenizer, tmp_path / "export"


def random_tokens(model, batch=3, length=16, seed=1):
    return torch.randint(0, model.shape.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_hf(folder, arm, **kwargs):
    if arm == "autoregressive":
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    return AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


@pytest.mark.parametrize("qk_norm,tied", VARIANTS)
@pytest.mark.parametrize("arm", ["autoregressive", "diffusion"])
@torch.no_grad()
def test_transformers_gives_dlmctls_logits(tmp_path, arm, qk_norm, tied):
    model, _, folder = exported(tmp_path, arm, qk_norm, tied)
    hf = load_hf(folder, arm)

    family = "Qwen3" if qk_norm else "Llama"
    assert type(hf).__name__ == (f"{family}ForCausalLM" if arm == "autoregressive" else f"Dlm{family}ForMaskedLM")
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    ids = random_tokens(model)
    expected = model(ids, causal=arm == "autoregressive")
    assert (hf(ids).logits - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arm", ["autoregressive", "diffusion"])
@torch.no_grad()
def test_only_the_diffusion_export_lets_later_tokens_change_earlier_predictions(tmp_path, arm, attn_implementation):
    model, _, folder = exported(tmp_path, arm, qk_norm=True)
    hf = load_hf(folder, arm, attn_implementation=attn_implementation)
    ids = random_tokens(model, batch=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % model.shape.vocab_size

    first, first_changed = hf(ids).logits[0, :-1], hf(changed).logits[0, :-1]
    if arm == "diffusion":
        assert (first - first_changed).abs().amax(-1).min() > 1e-3, "every earlier position sees the last token"
        assert (first - model(ids, causal=False)[0, :-1]).abs().max() <= TOLERANCE
    else:
        assert torch.equal(first, first_changed)


@pytest.mark.parametrize("qk_norm,tied", VARIANTS)
@torch.no_grad()
def test_greedy_generate_equals_dlmctls_greedy_sample(tmp_path, qk_norm, tied):
    model, tokenizer, folder = exported(tmp_path, "autoregressive", qk_norm, tied)
    hf = load_hf(folder, "autoregressive")
    for prompt in random_tokens(model, batch=2, length=5, seed=2):  # one at a time: both stop at eos
        prompt = prompt[None]
        ours = ar_generate(model, prompt, max_new_tokens=16, eos_id=tokenizer.eos_id)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16)
        assert theirs.tolist() == ours.tolist()


@pytest.mark.parametrize("qk_norm,tied,temperature", [*(pytest.param(*v.values, 0.0, id=v.id) for v in VARIANTS),
                                                      pytest.param(True, False, 1.0, id="qk_norm-untied-sampled")])
@torch.no_grad()
def test_dlmctls_diffusion_sampler_driven_by_transformers_gives_the_same_tokens(tmp_path, qk_norm, tied, temperature):
    model, tokenizer, folder = exported(tmp_path, "diffusion", qk_norm, tied)
    hf = load_hf(folder, "diffusion")

    def as_dlmctl_model(idx, *, causal):
        assert not causal
        return hf(idx).logits

    prompt = random_tokens(model, batch=2, length=6, seed=3)
    settings = dict(mask_id=tokenizer.mask_id, gen_length=12, steps=6, block_length=6, temperature=temperature, seed=4)
    ours = dlm_generate(model, prompt, **settings)
    assert not (ours == tokenizer.mask_id).any()
    assert dlm_generate(as_dlmctl_model, prompt, **settings).tolist() == ours.tolist()


def bpe_tokenizer() -> Tokenizer:
    texts = ["def main():\n    return 0\n", "for i in range(10):\n    print(i)\n", "héllo wörld, naïve café"] * 4
    return Tokenizer.train_bpe(texts, vocab_size=300)


@pytest.mark.parametrize("make_tokenizer", [Tokenizer.byte, bpe_tokenizer], ids=["byte", "bpe"])
@pytest.mark.parametrize("arm", ["autoregressive", "diffusion"])
def test_autotokenizer_encodes_as_dlmctl_and_knows_eos_and_mask(tmp_path, arm, make_tokenizer):
    tokenizer = make_tokenizer()
    _, _, folder = exported(tmp_path, arm, tokenizer=tokenizer)
    hf = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())

    for text in ["def main():\n    print(i)", "héllo wörld — 🙂", "a literal [MASK] and <|endoftext|> are text"]:
        ids = hf(text).input_ids
        assert ids == tokenizer.encode(text)
        assert hf.decode(ids) == text
        assert tokenizer.mask_id not in ids and tokenizer.eos_id not in ids
    assert hf.eos_token_id == tokenizer.eos_id == config["eos_token_id"]
    assert hf.mask_token_id == tokenizer.mask_id == config["mask_token_id"] == config["dlmctl"]["mask_token_id"]
    assert hf.decode([tokenizer.mask_id, tokenizer.eos_id]) == "[MASK]<|endoftext|>"
    assert hf.pad_token_id == config["pad_token_id"]


@pytest.mark.parametrize("qk_norm,model_class", [(False, LlamaForCausalLM), (True, Qwen3ForCausalLM)])
@pytest.mark.parametrize("tied", [True, False])
@torch.no_grad()
def test_the_architecture_class_builds_the_exported_shape_not_its_default(tmp_path, qk_norm, model_class, tied):
    model, _, folder = exported(tmp_path, "autoregressive", qk_norm, tied)
    hf = model_class.from_pretrained(folder).eval()
    shape, config = model.shape, hf.config

    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.head_dim, config.max_position_embeddings) == (
        shape.n_layer, shape.d_model, shape.n_head, shape.n_kv_head, shape.d_ff, shape.vocab_size, shape.head_dim,
        shape.max_seq_len)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": shape.rope_theta}
    assert config.rms_norm_eps == shape.norm_eps
    assert hf.num_parameters() == model.num_params()
    ids = random_tokens(model)
    assert (hf(ids).logits - model(ids, causal=True)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("qk_norm,tied", VARIANTS)
@pytest.mark.parametrize("arm", ["autoregressive", "diffusion"])
def test_load_export_reads_the_transformers_folder_back_into_dlmctl(tmp_path, arm, qk_norm, tied):
    model, tokenizer, folder = exported(tmp_path, arm, qk_norm, tied)
    loaded, loaded_tokenizer, loaded_arm = load_export(folder)

    assert loaded_arm.value == arm
    assert loaded.shape == model.shape
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied
    assert loaded_tokenizer.to_json() == tokenizer.to_json()


def test_a_bf16_model_exports_as_bf16(tmp_path):
    model, _, folder = exported(tmp_path, "autoregressive", dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(hf.model.embed_tokens.weight, model.embed.weight)


def test_config_records_the_arm_the_mask_and_for_the_diffusion_arm_the_elbo(tmp_path):
    _, tokenizer, ar = exported(tmp_path / "ar", "autoregressive")
    _, _, dlm = exported(tmp_path / "dlm", "diffusion", qk_norm=True)
    ar_config, dlm_config = (json.loads((f / "config.json").read_text()) for f in (ar, dlm))

    assert (ar_config["model_type"], ar_config["dlmctl"]["arm"]) == ("llama", "autoregressive")
    assert (dlm_config["model_type"], dlm_config["dlmctl"]["arm"]) == ("qwen3_dlm", "diffusion")
    assert "ELBO" in dlm_config["dlmctl"]["objective"] and "ELBO" not in ar_config["dlmctl"]["objective"]
    for config in (ar_config, dlm_config):
        assert config["mask_token_id"] == config["dlmctl"]["mask_token_id"] == tokenizer.mask_id
        assert config.get("rope_scaling") is None and config["hidden_act"] == "silu" and not config["attention_bias"]
    assert AutoConfig.from_pretrained(dlm, trust_remote_code=True).is_causal is False
    assert (dlm / "modeling_dlm.py").is_file() and not (ar / "modeling_dlm.py").exists()


def test_the_diffusion_export_is_no_causal_lm_and_does_not_generate_left_to_right(tmp_path):
    model, _, dlm = exported(tmp_path / "dlm", "diffusion")
    _, _, ar = exported(tmp_path / "ar", "autoregressive")
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(dlm, trust_remote_code=True)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForMaskedLM.from_pretrained(ar)
    hf = load_hf(dlm, "diffusion")
    with pytest.raises(NotImplementedError, match="iterative unmasking"):
        hf.generate(random_tokens(model, batch=1))
    backbone = AutoModel.from_pretrained(dlm, trust_remote_code=True).eval()
    ids = random_tokens(model, batch=1)
    with torch.no_grad():
        assert torch.allclose(hf.lm_head(backbone(ids).last_hidden_state), hf(ids).logits, atol=TOLERANCE)


def test_load_export_refuses_a_folder_that_is_not_a_dlmctl_export_in_one_line(tmp_path):
    model, _, folder = exported(tmp_path, "autoregressive")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match=r"empty: not a dlmctl export \(config.json: No such file"):
        load_export(empty)

    plain = tmp_path / "plain"  # a transformers Llama dlmctl did not write
    LlamaForCausalLM.from_pretrained(folder).save_pretrained(plain)
    config = json.loads((plain / "config.json").read_text())
    del config["dlmctl"]
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"plain/config.json: not a dlmctl export \(no dlmctl section"):
        load_export(plain)

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ExportError, match=r"model.safetensors: does not match config.json \(missing \['model.layers.2"):
        load_export(folder)
    (folder / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    with pytest.raises(ExportError, match="mlp_bias not supported"):
        load_export(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(ExportError, match="config.json: not JSON") as error:
        load_export(folder)
    assert isinstance(error.value, SpecError) and "\n" not in str(error.value), "the CLI prints it as one line"


@torch.no_grad()
def test_an_export_from_before_the_transformers_format_still_loads(tmp_path):
    """Format 1: dlmctl's parameter names and its own config.json (what a run finished earlier holds)."""
    run = tiny_run("diffusion", model={**SHAPE, "qk_norm": True, "tie_embeddings": True})
    tokenizer = Tokenizer.byte()
    model = build_model(run, tokenizer.vocab_size)
    scramble(model)
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(old / "model.safetensors"))
    (old / "config.json").write_text(json.dumps({"format": "dlmctl-export", "version": 1, "arm": "diffusion",
                                                 "shape": model.shape.model_dump(), "mask_id": tokenizer.mask_id}))
    tokenizer.save(old / "tokenizer.json")

    loaded, _, arm = load_export(old)
    ids = random_tokens(model)
    assert arm.value == "diffusion"
    assert torch.equal(loaded(ids, causal=False), model(ids, causal=False))


def test_dlmctl_export_rewrites_a_run_folders_export_as_a_transformers_checkpoint(tmp_path):
    """`dlmctl export RUN -o DIR` on a local run folder, whose export/ may still be format 1."""
    from dlmctl.cli.app import main

    run = tiny_run("diffusion", model={**SHAPE, "qk_norm": False, "tie_embeddings": False})
    tokenizer = Tokenizer.byte()
    model = build_model(run, tokenizer.vocab_size)
    scramble(model)
    old = tmp_path / "run" / "export"
    old.mkdir(parents=True)
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    (old / "config.json").write_text(json.dumps({"format": "dlmctl-export", "version": 1, "arm": "diffusion",
                                                 "shape": model.shape.model_dump()}))
    tokenizer.save(old / "tokenizer.json")
    (tmp_path / "run" / "run.json").write_text(run.model_dump_json())

    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")]) == 0
    hf = load_hf(tmp_path / "hf", "diffusion")
    ids = random_tokens(model)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids, causal=False)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("arm", ["autoregressive", "diffusion"])
@torch.no_grad()
def test_a_checkpoint_transformers_saved_again_still_loads_into_dlmctl(tmp_path, arm):
    """E.g. after fine-tuning with transformers: its save_pretrained keeps the dlmctl section but writes RoPE
    as rope_parameters only."""
    model, _, folder = exported(tmp_path, arm, qk_norm=arm == "diffusion", tied=arm == "autoregressive")
    load_hf(folder, arm).save_pretrained(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "again" / name).write_bytes((folder / name).read_bytes())

    loaded, _, loaded_arm = load_export(tmp_path / "again")
    ids = random_tokens(model)
    causal = arm == "autoregressive"
    assert loaded_arm.value == arm and loaded.shape == model.shape
    assert torch.equal(loaded(ids, causal=causal), model(ids, causal=causal))
