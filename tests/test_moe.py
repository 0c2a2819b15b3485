"""The mixture-of-experts variant against independent oracles: one expert is the dense model, a uniform router
is balanced, a token's routing is its own, and the spec refuses what cannot be built."""
import math

import pytest
import torch
import torch.nn.functional as F

from dlmctl.spec import ModelShape, SpecError, experiment_from_dict
from dlmctl.spec.model import MoEShape
from dlmctl.spec.sections import ObjectiveSpec
from dlmctl.trainer.models import VARIANTS, MoETransformer, Transformer, build
from dlmctl.trainer.models.moe import MoEFeedForward, load_balancing_loss
from dlmctl.trainer.objectives import ar_loss, objective_loss

DENSE = dict(vocab_size=97, max_seq_len=32, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, qk_norm=True)


def moe_shape(**moe) -> ModelShape:
    return ModelShape(**DENSE, variant="moe", moe=MoEShape(**{"experts": 4, "top_k": 2, "expert_d_ff": 48, **moe}))


def tokens(batch=3, seq_len=32, seed=0):
    return torch.randint(0, 97, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def test_the_registry_builds_each_variant_the_spec_names():
    assert set(VARIANTS) == set(ModelShape.model_fields["variant"].annotation.__args__)
    assert type(build(ModelShape(**DENSE))) is Transformer
    assert type(build(moe_shape())) is MoETransformer


@pytest.mark.parametrize("causal", [False, True])
def test_one_expert_with_top_1_is_the_dense_model(causal):
    torch.manual_seed(0)
    dense = Transformer(ModelShape(**DENSE))
    moe = MoETransformer(moe_shape(experts=1, top_k=1, expert_d_ff=DENSE["d_ff"]))
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert missing == [f"blocks.{i}.mlp.gate.weight" for i in range(2)] and not unexpected
    idx = tokens()
    out_dense, out_moe = dense(idx, causal=causal), moe(idx, causal=causal)
    torch.testing.assert_close(out_moe, out_dense, rtol=0, atol=1e-6)
    out_dense.square().mean().backward()
    out_moe.square().mean().backward()
    moe_grads = dict(moe.named_parameters())
    for name, p in dense.named_parameters():
        torch.testing.assert_close(moe_grads[name.replace(".mlp.", ".mlp.experts.0.")].grad, p.grad, rtol=1e-5, atol=1e-7)


def test_the_load_balancing_loss_is_zero_for_a_uniform_router_and_grows_as_routing_collapses():
    torch.manual_seed(0)
    layer = MoEFeedForward(64, MoEShape(experts=6, top_k=2, expert_d_ff=32))
    torch.nn.init.zeros_(layer.gate.weight)  # every expert equally likely for every token
    layer(torch.randn(2, 16, 64))
    assert layer.balance_loss.item() == pytest.approx(0.0, abs=1e-6)
    assert layer.z_loss.item() == pytest.approx(math.log(6) ** 2, rel=1e-6), "(log-partition of zero logits)^2"
    n, experts = 10, 6
    collapsed = load_balancing_loss(F.one_hot(torch.zeros(n, dtype=torch.long), experts).float(),
                                    torch.zeros(n, 1, dtype=torch.long), experts)
    assert collapsed.item() == pytest.approx(experts - 1), "all tokens on one expert with probability 1"
    torch.nn.init.normal_(layer.gate.weight, std=1.0)
    layer(torch.randn(2, 16, 64))
    assert layer.balance_loss.item() > 0


def test_the_training_loss_adds_the_weighted_auxiliary_loss_and_its_gradient_reaches_the_router():
    torch.manual_seed(0)
    model = MoETransformer(moe_shape(aux_loss_coef=0.5, z_loss_coef=0.25))
    objective = ObjectiveSpec()
    idx, index = tokens(), torch.arange(3)
    loss, stats = objective_loss("ar", model, idx, index, step=0, seed=0, objective=objective, mask_id=96,
                                 global_batch=3)
    plain, _ = ar_loss(model, idx, index, 0, 0, objective.autoregressive, 96)
    layers = model.moe_layers()
    balance = sum(m.balance_loss for m in layers) / 2
    z = sum(m.z_loss for m in layers) / 2
    assert stats["aux_loss"].item() == pytest.approx((0.5 * balance + 0.25 * z).item(), rel=1e-6)
    assert loss.item() == pytest.approx(plain.item() + stats["aux_loss"].item(), rel=1e-6)
    (loss - plain).backward()  # the auxiliary part alone
    assert layers[0].gate.weight.grad.abs().sum() > 0
    last_expert = layers[-1].experts[0].up_proj.weight  # feeds no router: the auxiliary loss does not reach it
    assert last_expert.grad is None or not last_expert.grad.any()


def test_a_dense_model_adds_nothing():
    torch.manual_seed(0)
    model = Transformer(ModelShape(**DENSE))
    loss, stats = objective_loss("ar", model, tokens(), torch.arange(3), 0, 0, ObjectiveSpec(), 96, 3)
    assert "aux_loss" not in stats
    assert loss.item() == ar_loss(model, tokens(), torch.arange(3), 0, 0, ObjectiveSpec().autoregressive, 96)[0].item()


def routes(model: MoETransformer, idx: torch.Tensor) -> list[torch.Tensor]:
    """Each block's chosen experts [B, T, k] in a forward pass of `idx`."""
    chosen = []
    hooks = [m.register_forward_hook(lambda m, args, out: chosen.append(m.route(args[0].flatten(0, 1))[2]))
             for m in model.moe_layers()]
    model(idx, causal=False)
    for hook in hooks:
        hook.remove()
    return [c.view(*idx.shape, -1) for c in chosen]


def test_a_tokens_routing_and_output_do_not_depend_on_the_rows_beside_it():
    torch.manual_seed(0)
    model = MoETransformer(moe_shape(experts=8, top_k=2)).eval()
    batch = tokens(batch=4)
    together, together_routes = model(batch, causal=False), routes(model, batch)
    for rows in ([2], [3, 0], [1, 2, 3]):  # alone, reordered, another micro-batch split
        part, part_routes = model(batch[rows], causal=False), routes(model, batch[rows])
        for j, row in enumerate(rows):
            torch.testing.assert_close(part[j], together[row], rtol=1e-5, atol=1e-5)
            for layer in range(2):
                assert torch.equal(part_routes[layer][j], together_routes[layer][row])
    again = model(batch, causal=False)
    assert torch.equal(again, together), "deterministic"


def test_a_capacity_drops_an_experts_slots_beyond_it_in_token_order():
    torch.manual_seed(0)
    moe = MoEShape(experts=4, top_k=1, expert_d_ff=32, capacity_factor=0.5)
    layer = MoEFeedForward(64, moe)
    x = torch.randn(1, 16, 64)
    capacity = moe.capacity(16)
    assert capacity == 2  # ceil(0.5 x 16 x 1 / 4)
    out = layer(x)[0]
    chosen = layer.route(x[0])[2][:, 0]
    for expert in range(4):
        mine = torch.nonzero(chosen == expert).flatten()
        kept, dropped = mine[:capacity], mine[capacity:]
        torch.testing.assert_close(out[kept], layer.experts[expert](x[0, kept]))  # top-1 weight is 1
        assert not out[dropped].any(), "a dropped token's expert adds nothing"


@pytest.mark.parametrize("wrap", ["activation_checkpointing", "compile"])
def test_the_auxiliary_loss_and_its_gradients_survive_the_engines_wrapping_of_the_blocks(wrap):
    from dlmctl.trainer.engine import apply_activation_checkpointing

    def step(model):
        out = model(tokens(batch=2), causal=False)
        aux, _ = model.auxiliary_loss()
        (out.square().mean() + aux).backward()
        return aux.item(), {k.replace("_checkpoint_wrapped_module.", ""): p.grad for k, p in model.named_parameters()}

    torch.manual_seed(0)
    plain = step(MoETransformer(moe_shape()))
    torch.manual_seed(0)
    wrapped = MoETransformer(moe_shape())
    if wrap == "compile":
        for block in wrapped.blocks:
            block.compile(backend="aot_eager")  # dynamo's tracing as on CUDA, without a C++ compiler
    else:
        apply_activation_checkpointing(wrapped)
    aux, grads = step(wrapped)
    assert aux == plain[0]
    for name, grad in plain[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-8)


def spec(**model):
    return {"metadata": {"name": "m"}, "spec": {"model": model}}


@pytest.mark.parametrize("model, message", [
    ({"preset": "nano", "moe": {"experts": 4, "top_k": 5}}, "spec.model: moe.top_k (5) must be at most moe.experts (4)"),
    ({"preset": "nano", "variant": "dense", "moe": {"experts": 4}}, "spec.model.moe: only for variant moe"),
    ({"preset": "nano", "variant": "sparse"}, "spec.model.variant"),
    ({"preset": "nano", "moe": {"experts": 0}}, "spec.model.moe.experts"),
    ({"preset": "nano", "moe": {"capacity_factor": 0}}, "spec.model.moe.capacity_factor"),
])
def test_the_spec_refuses_a_mixture_it_cannot_build_in_one_line_naming_the_field(model, message):
    with pytest.raises(SpecError) as caught:
        experiment_from_dict(spec(**model))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_moe_section_makes_a_moe_whose_unset_fields_come_from_the_preset_then_the_defaults():
    shape = experiment_from_dict(spec(preset="8b1a", moe={"top_k": 4})).spec.model.resolve(50304, 2048)
    assert (shape.variant, shape.moe.experts, shape.moe.top_k, shape.moe.expert_d_ff) == ("moe", 96, 4, 592)
    shape = experiment_from_dict(spec(preset="nano", moe={"experts": 4})).spec.model.resolve(512, 32)
    assert (shape.moe.top_k, shape.moe.expert_d_ff, shape.moe.capacity_factor) == (2, shape.d_ff, None)
    assert experiment_from_dict(spec(preset="nano")).spec.model.resolve(512, 32).moe is None


def test_the_8b1a_preset_holds_8b_parameters_of_which_a_token_uses_as_many_as_the_dense_1b():
    """Counted from the shapes by hand: attention 4 d^2, a SwiGLU 3 d f, a router d E, norms 2 d + 2 head_dim
    per block (QK-norm), tied 50304 x d embedding."""
    d, layers, vocab, head = 1792, 26, 50304, 128
    per_block_shared = 4 * d * d + 2 * d + 2 * head
    dense_1b = vocab * d + d + layers * (per_block_shared + 3 * d * 4736)
    total = vocab * d + d + layers * (per_block_shared + d * 96 + 96 * 3 * d * 592)
    active = vocab * d + d + layers * (per_block_shared + d * 96 + 8 * 3 * d * 592)
    with torch.device("meta"):
        moe = build(experiment_from_dict(spec(preset="8b1a")).spec.model.resolve(vocab, 2048))
        dense = build(experiment_from_dict(spec(preset="1b")).spec.model.resolve(vocab, 2048))
    assert (moe.num_params(), moe.active_params(), dense.num_params()) == (total, active, dense_1b)
    assert 8.0e9 < total < 8.5e9 and active - dense_1b == layers * d * 96


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["diffusion", "autoregressive"])
def test_a_tiny_mixture_of_experts_trains_both_arms_end_to_end(tmp_path, arm):
    from trainer_runs import tiny_run, trains_and_learns

    run = tiny_run(arm, data={"epochs": 4}, model={"preset": "nano", "moe": {"experts": 4, "top_k": 2}})
    out = tmp_path / "out"
    trains_and_learns(run, out)
    log = (tmp_path / "out.log").read_text()
    assert "auxiliary loss" in log and "variant: moe has no Hugging Face export" in log
    assert not (out / "export").exists(), "the run ends without an export, its checkpoint holds the weights"
