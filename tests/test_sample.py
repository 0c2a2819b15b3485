"""Generation: block-wise low-confidence unmasking for DLM, KV-cached decoding for AR."""
import pytest
import torch

from dlmctl.spec import ModelShape
from dlmctl.trainer.models import Transformer
from dlmctl.trainer.runs import sample_run
from dlmctl.trainer.sample import ar_generate, dlm_generate, generate, num_transfer_tokens

V, MASK, EOS = 40, 39, 38


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(seed=0, max_seq_len=48) -> Transformer:
    torch.manual_seed(seed)
    shape = ModelShape(n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=V, max_seq_len=max_seq_len)
    return Transformer(shape).eval()


class Recording(torch.nn.Module):
    """Wraps a model (or a logits function) and keeps every input it was called with."""

    def __init__(self, logits_fn, max_seq_len=48):
        super().__init__()
        self.logits_fn, self.inputs = logits_fn, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.shape = ModelShape(n_layer=1, d_model=8, n_head=1, n_kv_head=1, d_ff=8, vocab_size=V, max_seq_len=max_seq_len)

    def forward(self, idx, *, causal, **kwargs):
        self.inputs.append(idx.clone())
        return self.logits_fn(idx)


def oracle(target):
    """Logits peaked on target[position] at every position."""
    return lambda idx: 50.0 * torch.nn.functional.one_hot(target[: idx.shape[1]], V).float().expand(idx.shape[0], -1, -1)


def test_kv_cache_generation_equals_generation_without_cache():
    model, prompt = tiny_model(), torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(0))
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=5, seed=3)):
        cached = ar_generate(model, prompt, max_new_tokens=20, use_cache=True, **kwargs)
        uncached = ar_generate(model, prompt, max_new_tokens=20, use_cache=False, **kwargs)
        assert cached.shape == (3, 25)
        assert torch.equal(cached, uncached)
        assert torch.equal(cached[:, :5], prompt)


def test_ar_sampling_is_seeded_and_top_k_restricts_the_choices():
    model, prompt = tiny_model(), torch.zeros(4, 3, dtype=torch.long)
    one = ar_generate(model, prompt, max_new_tokens=16, temperature=1.0, seed=1)
    assert torch.equal(one, ar_generate(model, prompt, max_new_tokens=16, temperature=1.0, seed=1))
    assert not torch.equal(one, ar_generate(model, prompt, max_new_tokens=16, temperature=1.0, seed=2))
    top1 = ar_generate(model, prompt, max_new_tokens=16, temperature=1.0, top_k=1, seed=5)
    assert torch.equal(top1, ar_generate(model, prompt, max_new_tokens=16, temperature=0.0))


def test_ar_generation_stops_when_every_row_has_emitted_eos():
    target = torch.tensor([1, 2, 3, EOS, 5, 6, 7, 8, 9, 10, 11, 12])
    model = Recording(lambda idx: oracle(target[1:])(idx))  # AR oracle: predicts the next target token
    out = ar_generate(model, target[None, :1], max_new_tokens=10, eos_id=EOS, use_cache=False)
    assert out[0].tolist() == [1, 2, 3, EOS]


def test_transfer_counts_spread_the_masked_tokens_evenly_over_the_steps():
    counts = num_transfer_tokens(torch.tensor([[True] * 10, [True] * 3 + [False] * 7]), steps=4)
    assert counts.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_dlm_generation_unmasks_one_block_at_a_time():
    backbone = tiny_model()
    model = Recording(lambda idx: backbone(idx, causal=False))
    prompt = torch.tensor([[5, 6, 7]])
    out = dlm_generate(model, prompt, mask_id=MASK, gen_length=8, block_length=4, steps=8)
    assert len(model.inputs) == 8
    assert torch.equal(out[:, :3], prompt) and not (out == MASK).any()
    for i, seen in enumerate(model.inputs):
        answer = seen[0, 3:]
        assert (answer == MASK).sum() == 8 - i  # one token revealed per step
        if i < 4:
            assert (answer[4:] == MASK).all()  # the second block waits for the first
        else:
            assert not (answer[:4] == MASK).any()


def test_low_confidence_remasking_keeps_the_most_confident_predictions():
    # Confidence grows with position: inside a block, tokens are revealed right to left.
    def logits(idx):
        scale = torch.arange(idx.shape[1], dtype=torch.float32)[None, :, None] * 0.5
        return scale * torch.nn.functional.one_hot(torch.full_like(idx, 7), V).float()

    model = Recording(logits)
    dlm_generate(model, torch.tensor([[1, 2]]), mask_id=MASK, gen_length=6, block_length=3, steps=6)
    revealed = [int((a[0] != MASK).logical_and(b[0] == MASK).nonzero()) for a, b in zip(model.inputs[1:], model.inputs)]
    assert revealed == [4, 3, 2, 7, 6]  # the last step's reveal (position 5) is not observed by the model


def test_dlm_generation_reproduces_an_oracle_at_any_temperature():
    target = torch.randint(0, 30, (20,), generator=torch.Generator().manual_seed(1))
    for temperature in (0.0, 1.0):
        out = dlm_generate(Recording(oracle(target)), target[None, :4], mask_id=MASK, gen_length=16, block_length=8,
                           steps=4, temperature=temperature)
        assert torch.equal(out[0], target)


def test_dlm_sampling_is_seeded():
    model, prompt = tiny_model(), torch.tensor([[3, 4, 5]])
    sample = lambda seed: dlm_generate(model, prompt, mask_id=MASK, gen_length=12, block_length=4, steps=6,
                                       temperature=1.0, seed=seed)
    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_generate_returns_only_the_new_tokens_for_either_arm():
    model = tiny_model()
    for arm in ("diffusion", "autoregressive"):
        new = generate(model, arm, [1, 2, 3], gen_length=8, mask_id=MASK, block_length=4)
        assert isinstance(new, list) and len(new) == 8 and MASK not in new
        batch = generate(model, arm, torch.tensor([[1, 2, 3], [4, 5, 6]]), gen_length=8, mask_id=MASK)
        assert batch.shape == (2, 8)
        assert batch[0].tolist() == generate(model, arm, [1, 2, 3], gen_length=8, mask_id=MASK)


def test_long_prompts_are_cut_from_the_left_to_fit():
    model = tiny_model(max_seq_len=16)
    prompt = list(range(30))
    for arm in ("diffusion", "autoregressive"):
        assert generate(model, arm, prompt, gen_length=6, mask_id=MASK) == generate(model, arm, prompt[-10:], gen_length=6, mask_id=MASK)


@pytest.mark.parametrize("kwargs,message", [
    (dict(gen_length=10, block_length=4), "multiple of block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "multiple of the number of blocks"),
    (dict(gen_length=100), "max_seq_len"),
])
def test_bad_generation_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), "diffusion", [1, 2], mask_id=MASK, **kwargs)


@pytest.mark.parametrize("arm", ["diffusion", "autoregressive"])
def test_sample_run_continues_a_prompt_from_a_local_run_folder(tmp_path, arm):
    """The `dlmctl sample RUN --prompt` contract, on a run folder holding an export."""
    from trainer_runs import tiny_run

    from dlmctl.trainer.export import save_export
    from dlmctl.trainer.runs import build_model
    from dlmctl.trainer.tokenizer import Tokenizer

    run, tokenizer = tiny_run(arm), Tokenizer.byte()
    torch.manual_seed(0)
    save_export(build_model(run, tokenizer.vocab_size), tokenizer, run, tmp_path / "export")
    (tmp_path / "run.json").write_text(run.model_dump_json())
    text = sample_run(tmp_path, "def f(", max_new_tokens=8, steps=4, seed=1)
    assert isinstance(text, str)
    assert text == sample_run(tmp_path, "def f(", max_new_tokens=8, steps=4, seed=1)
