"""The backbone: one module for both arms, differing only in the attention mask."""
import math

import pytest
import torch
import torch.nn.functional as F

from dlmctl.spec import ModelShape, ModelSpec
from dlmctl.trainer.models import Transformer


def tiny_shape(**overrides) -> ModelShape:
    fields = dict(n_layer=2, d_model=32, n_head=4, n_kv_head=4, d_ff=64, vocab_size=50, max_seq_len=32)
    return ModelShape(**(fields | overrides))


def expected_params(s: ModelShape) -> int:
    """Parameters by formula: attention (q, o: d x d; k, v: d x n_kv*hd), SwiGLU (3 d x d_ff), two norms
    per layer (+ two head_dim QK-norms), final norm, embedding and (if untied) the output head."""
    kv = s.n_kv_head * s.head_dim
    per_layer = 2 * s.d_model * s.d_model + 2 * s.d_model * kv + 3 * s.d_model * s.d_ff + 2 * s.d_model
    per_layer += 2 * s.head_dim if s.qk_norm else 0
    embeddings = s.vocab_size * s.d_model * (1 if s.tie_embeddings else 2)
    return s.n_layer * per_layer + s.d_model + embeddings


def test_forward_gives_logits_over_the_vocabulary():
    model = Transformer(tiny_shape())
    idx = torch.randint(0, 50, (3, 10))
    for causal in (True, False):
        assert model(idx, causal=causal).shape == (3, 10, 50)


def test_bidirectional_attention_sees_the_future_and_causal_does_not():
    torch.manual_seed(0)
    model = Transformer(tiny_shape())
    a = torch.randint(0, 50, (1, 12))
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % 50
    assert torch.equal(model(a, causal=True)[:, :-1], model(b, causal=True)[:, :-1])
    assert not torch.allclose(model(a, causal=False)[:, :-1], model(b, causal=False)[:, :-1])


def test_dlm_and_ar_forward_differ_only_in_the_attention_mask(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(tiny_shape())
    idx = torch.randint(0, 50, (2, 12))
    sdpa = F.scaled_dot_product_attention
    calls = []

    def recording(q, k, v, **kwargs):
        calls.append((q, k, v, kwargs))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model(idx, causal=True)
    model(idx, causal=False)
    ar_first, dlm_first = calls[0], calls[model.shape.n_layer]
    for a, b in zip(ar_first[:3], dlm_first[:3]):  # the first layer's q, k, v are identical
        assert torch.equal(a, b)
    differing = {key for key in ar_first[3] if ar_first[3][key] != dlm_first[3][key]}
    assert differing == {"is_causal"}

    # Force the same mask on both: the outputs are then bit-identical.
    for forced in (True, False):
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda q, k, v, **kw: sdpa(q, k, v, **(kw | {"is_causal": forced})))
        assert torch.equal(model(idx, causal=True), model(idx, causal=False))


def test_kv_cache_decoding_equals_the_full_forward():
    torch.manual_seed(0)
    model = Transformer(tiny_shape(n_kv_head=2))
    idx = torch.randint(0, 50, (2, 20))
    cache = model.new_kv_cache(batch=2)
    pieces = [model(idx[:, :9], causal=True, kv_cache=cache, start_pos=0),  # prefill
              model(idx[:, 9:13], causal=True, kv_cache=cache, start_pos=9)]  # a chunk after a prefix
    pieces += [model(idx[:, i:i + 1], causal=True, kv_cache=cache, start_pos=i) for i in range(13, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), model(idx, causal=True), atol=1e-5, rtol=1e-5)


def test_kv_cache_is_refused_for_bidirectional_attention():
    model = Transformer(tiny_shape())
    with pytest.raises(ValueError, match="causal"):
        model(torch.zeros(1, 4, dtype=torch.long), causal=False, kv_cache=model.new_kv_cache(1))


def test_sequences_longer_than_max_seq_len_are_refused():
    model = Transformer(tiny_shape())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long), causal=True)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_grouped_query_attention_and_qk_norm(n_kv_head, qk_norm):
    shape = tiny_shape(n_kv_head=n_kv_head, qk_norm=qk_norm)
    model = Transformer(shape)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (shape.n_head * shape.head_dim, shape.d_model)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (n_kv_head * shape.head_dim, shape.d_model)
    assert isinstance(attn.q_norm, torch.nn.Identity) != qk_norm
    logits = model(torch.randint(0, 50, (2, 7)), causal=False)
    logits.sum().backward()
    assert logits.shape == (2, 7, 50)
    assert all(p.grad is not None for p in model.parameters())
    assert model.num_params() == expected_params(shape)


def test_tied_and_untied_parameter_counts():
    tied, untied = Transformer(tiny_shape(tie_embeddings=True)), Transformer(tiny_shape(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() - tied.num_params() == 50 * 32
    assert tied.num_params() == expected_params(tied.shape)
    assert untied.num_params() == expected_params(untied.shape)
    assert tied.num_params(exclude_embeddings=True) == untied.num_params(exclude_embeddings=True)
    assert tied.num_params(exclude_embeddings=True) == tied.num_params() - 50 * 32


def test_published_1b_shape_builds_on_the_meta_device():
    shape = ModelSpec(preset="1b").resolve(vocab_size=50_304, max_seq_len=2048)
    assert (shape.n_layer, shape.d_model, shape.n_head, shape.d_ff, shape.tie_embeddings) == (26, 1792, 14, 4736, True)
    assert (shape.qk_norm, shape.norm_eps) == (True, 1e-6), "MegaDLMs' gpt2_1b_dlm: QK-norm, RMSNorm eps 1e-6"
    with torch.device("meta"):
        model = Transformer(shape)
    per_layer = 4 * 1792**2 + 3 * 1792 * 4736 + 2 * 1792 + 2 * 128  # + the per-head q and k norms (head_dim 128)
    assert model.num_params() == 26 * per_layer + 1792 + 50_304 * 1792 == expected_params(shape)
    assert model.num_params(exclude_embeddings=True) == 996_052_224  # ~1.0B non-embedding


def test_published_1_7b_shape_builds_on_the_meta_device():
    shape = ModelSpec(preset="1.7b").resolve(vocab_size=50_304, max_seq_len=2048)
    with torch.device("meta"):
        model = Transformer(shape)
    assert model.num_params() == expected_params(shape)


def test_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(tiny_shape(n_layer=8, d_model=256, d_ff=512, vocab_size=1000))
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for projection in (model.blocks[3].attn.o_proj, model.blocks[3].mlp.down_proj):
        assert projection.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_dropout_is_active_in_training_only():
    model = Transformer(tiny_shape(dropout=0.3, attention_dropout=0.3))
    idx = torch.randint(0, 50, (2, 8))
    model.train()
    assert not torch.equal(model(idx, causal=True), model(idx, causal=True))
    model.eval()
    assert torch.equal(model(idx, causal=True), model(idx, causal=True))


def forward_keeping_count(model, idx) -> tuple[torch.Tensor, int]:
    """The loss, and how many tensors autograd keeps for the backward pass (a checkpointed region keeps only
    its inputs: what it saves inside is its own, recomputed in the backward)."""
    kept = 0

    def pack(tensor):
        nonlocal kept
        kept += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(idx, causal=False).square().mean()
    return loss, kept


def test_the_engines_activation_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients():
    from dlmctl.trainer.engine import apply_activation_checkpointing

    torch.manual_seed(0)
    model = Transformer(tiny_shape(n_layer=4, dropout=0.2))  # dropout: the recomputation must replay its masks
    idx = torch.randint(0, 50, (2, 8))
    torch.manual_seed(1)
    loss, kept_plain = forward_keeping_count(model, idx)
    loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    apply_activation_checkpointing(model)
    torch.manual_seed(1)
    checkpointed_loss, kept_checkpointed = forward_keeping_count(model, idx)
    checkpointed_loss.backward()
    assert checkpointed_loss.item() == loss.item()
    for expected, p in zip(reference, model.parameters()):
        torch.testing.assert_close(p.grad, expected)
    assert kept_checkpointed < kept_plain / 4, (kept_checkpointed, kept_plain)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_key_padding_makes_each_row_its_prefix_run_alone(causal, n_kv_head):
    torch.manual_seed(0)
    model = Transformer(tiny_shape(n_kv_head=n_kv_head)).eval()
    idx, lengths = torch.randint(0, 50, (3, 12)), torch.tensor([12, 5, 1])
    padded = model(idx, causal=causal, lengths=lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = model(idx[row:row + 1, :length], causal=causal)[0]
        torch.testing.assert_close(padded[row, :length], alone, atol=1e-5, rtol=1e-5)
    # Full lengths hide nothing: the same logits as no key padding.
    torch.testing.assert_close(model(idx, causal=causal, lengths=torch.full((3,), 12)), model(idx, causal=causal),
                               atol=1e-5, rtol=1e-5)


def test_key_padding_only_masks_attention_when_asked(monkeypatch):
    """Without lengths SDPA gets no mask (its fused kernels stay available); with them, a [B, 1, 1, T] one."""
    model, idx = Transformer(tiny_shape()), torch.randint(0, 50, (2, 6))
    sdpa, masks = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: masks.append((kw["attn_mask"], kw["is_causal"])) or sdpa(q, k, v, **kw))
    model(idx, causal=False)
    assert masks[0] == (None, False)
    model(idx, causal=False, lengths=torch.tensor([6, 2]))
    mask, is_causal = masks[model.shape.n_layer]
    assert mask.shape == (2, 1, 1, 6) and not is_causal
    assert mask[1, 0, 0].tolist() == [True, True, False, False, False, False]


def test_key_padding_is_refused_with_a_kv_cache():
    model = Transformer(tiny_shape())
    with pytest.raises(ValueError, match="lengths"):
        model(torch.zeros(1, 4, dtype=torch.long), causal=True, kv_cache=model.new_kv_cache(1),
              lengths=torch.tensor([2]))


def test_key_padding_passes_through_checkpointed_blocks():
    from dlmctl.trainer.engine import apply_activation_checkpointing

    torch.manual_seed(0)
    model = Transformer(tiny_shape())
    idx, lengths = torch.randint(0, 50, (2, 8)), torch.tensor([8, 3])
    model(idx, causal=False, lengths=lengths).square().mean().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model)
    model(idx, causal=False, lengths=lengths).square().mean().backward()
    for expected, p in zip(reference, model.parameters()):
        torch.testing.assert_close(p.grad, expected)
