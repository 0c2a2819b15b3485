"""The masked-diffusion and autoregressive objectives: their expectations, masking statistics,
label conventions and rank-independent randomness."""
import math

import pytest
import torch

from dlmctl.spec import ModelShape
from dlmctl.spec.sections import AutoregressiveSpec, DiffusionSpec, ObjectiveSpec
from dlmctl.trainer.model import Transformer
from dlmctl.trainer.objectives import (
    ar_loss, diffusion_loss, diffusion_mask, mask_probability, objective_loss, step_length,
)

V, MASK = 64, 63


pytestmark = pytest.mark.usefixtures("single_thread")


class UniformModel(torch.nn.Module):
    """Logits fixed at zero: every token has probability 1/V."""

    def forward(self, idx, *, causal):
        return torch.zeros(*idx.shape, V)


class Oracle(torch.nn.Module):
    """Puts all its mass on `targets` (same positions as its input), whatever the input."""

    def __init__(self, targets):
        super().__init__()
        self.targets, self.inputs = targets, []

    def forward(self, idx, *, causal):
        self.inputs.append((idx.clone(), causal))
        return 50.0 * torch.nn.functional.one_hot(self.targets[:, : idx.shape[1]], V).float()


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelShape(n_layer=2, d_model=32, n_head=4, n_kv_head=4, d_ff=64, vocab_size=V, max_seq_len=32))
    return model.eval()


def tokens(B, L, seed=0):
    return torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(seed))


def indices(step, B):
    return torch.arange(step * B, (step + 1) * B)


def expectation_over_t(f, cfg: DiffusionSpec, points=200_000) -> float:
    """E_t[f(p(t))] for t ~ U(eps, 1), by the midpoint rule in float64."""
    t = cfg.eps + (1 - cfg.eps) * (torch.arange(points, dtype=torch.float64) + 0.5) / points
    return float(f(mask_probability(t, cfg.mask_schedule)).mean())


def mean_and_standard_error(values):
    values = torch.tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


@pytest.mark.parametrize("schedule", ["linear"])
def test_uniform_model_dlm_loss_is_ln_v_with_realized_weighting(schedule):
    cfg = DiffusionSpec(mask_schedule=schedule, eps=0.0, loss_weight="realized")
    draws = [diffusion_loss(UniformModel(), tokens(32, 16, s), indices(s, 32), s, 7, cfg, MASK, 32)[0].item()
             for s in range(100)]
    mean, se = mean_and_standard_error(draws)
    # Dividing by the realized ratio makes every draw exactly ln V: the estimator has no variance.
    assert se < 1e-6
    assert mean == pytest.approx(math.log(V), abs=1e-5 + 5 * se)


def test_uniform_model_dlm_loss_is_ln_v_with_sampled_weighting():
    cfg = DiffusionSpec(mask_schedule="linear", eps=0.05, loss_weight="sampled")
    L = 16
    draws = [diffusion_loss(UniformModel(), tokens(32, L, s), indices(s, 32), s, 7, cfg, MASK, 32)[0].item()
             for s in range(400)]
    mean, se = mean_and_standard_error(draws)
    # E[n_masked / (p L)] = 1, plus the bias of the one-token fallback for rows that drew no mask.
    fallback = expectation_over_t(lambda p: (1 - p) ** L / (p * L), cfg)
    assert fallback < 0.05
    assert mean == pytest.approx(math.log(V) * (1 + fallback), abs=5 * se)
    assert se < 0.02  # enough draws that the check has teeth


def test_uniform_model_ar_loss_is_ln_v():
    for ratio in (0.0, 0.3):
        loss, _ = ar_loss(UniformModel(), tokens(8, 16), indices(0, 8), 0, 7, AutoregressiveSpec(input_mask_ratio=ratio), MASK)
        assert loss.item() == pytest.approx(math.log(V), abs=1e-6)


@pytest.mark.parametrize("schedule,eps", [("linear", 0.0), ("linear", 1e-3), ("linear", 0.2)])
def test_realized_mask_ratio_matches_the_schedule_and_no_row_is_left_unmasked(schedule, eps):
    cfg = DiffusionSpec(mask_schedule=schedule, eps=eps)
    L, B = 8, 64
    ratios, unmasked_rows = [], 0
    for step in range(60):
        x = tokens(B, L, step)
        noisy, masked, t, p = diffusion_mask(x, indices(step, B), step, 3, cfg, MASK, B)
        unmasked_rows += int((~masked.any(1)).sum())
        assert torch.equal(noisy == MASK, masked)
        assert torch.equal(noisy[~masked], x[~masked])
        assert ((t >= eps) & (t <= 1)).all()
        ratios += (masked.sum(1) / L).tolist()
    assert unmasked_rows == 0
    mean, se = mean_and_standard_error(ratios)
    # E[realized] = E[p(t)] + P(no token masked) / L (the fallback position).
    expected = expectation_over_t(lambda p: p + (1 - p) ** L / L, cfg)
    assert mean == pytest.approx(expected, abs=5 * se)
    assert expectation_over_t(lambda p: p, cfg) == pytest.approx(mean_mask_probability(schedule, eps), rel=1e-6)


def mean_mask_probability(schedule, eps):
    """E[p(t)], t ~ U(eps, 1), in closed form: linear (1 + eps) / 2."""
    assert schedule == "linear"
    return (1 + eps) / 2


def test_diffusion_predicts_the_clean_token_at_the_same_position_and_ar_the_next():
    x = tokens(4, 12)
    dlm_oracle, ar_oracle = Oracle(x), Oracle(x[:, 1:])
    dlm, _ = diffusion_loss(dlm_oracle, x, indices(0, 4), 0, 1, DiffusionSpec(), MASK, 4)
    ar, _ = ar_loss(ar_oracle, x, indices(0, 4), 0, 1, AutoregressiveSpec(), MASK)
    assert dlm.item() < 1e-6 and ar.item() < 1e-6
    assert dlm_oracle.inputs[0][1] is False and ar_oracle.inputs[0][1] is True
    assert torch.equal(ar_oracle.inputs[0][0], x[:, :-1])
    # A shifted DLM target or an unshifted AR target is heavily penalised.
    assert diffusion_loss(Oracle(x[:, 1:]), x[:, :11], indices(0, 4), 0, 1, DiffusionSpec(), MASK, 4)[0] > 10
    assert ar_loss(Oracle(x), x, indices(0, 4), 0, 1, AutoregressiveSpec(), MASK)[0] > 10


def test_loss_is_normalised_by_rows_times_sequence_length():
    x = tokens(4, 12)
    noisy, masked, _, p = diffusion_mask(x, indices(5, 4), 5, 1, DiffusionSpec(), MASK, 4)
    model = tiny_model()
    logits = model(noisy, causal=False)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x, reduction="none")
    realized = masked.float().mean(1, keepdim=True)
    expected = (ce * masked / realized).sum() / (4 * 12)
    loss, stats = diffusion_loss(model, x, indices(5, 4), 5, 1, DiffusionSpec(), MASK, 4)
    torch.testing.assert_close(loss, expected)
    sampled = (ce * masked / p[:, None].float()).sum() / (4 * 12)
    torch.testing.assert_close(diffusion_loss(model, x, indices(5, 4), 5, 1, DiffusionSpec(loss_weight="sampled"), MASK, 4)[0], sampled)
    assert stats["mask_ratio"].item() == pytest.approx(realized.mean().item())


@pytest.mark.parametrize("antithetic", [False, True])
def test_masks_do_not_depend_on_how_the_global_batch_is_split(antithetic):
    """One process with the whole batch and two ranks with half each draw identical masks and losses."""
    cfg = DiffusionSpec(antithetic=antithetic)
    model, step, B = tiny_model(), 3, 8
    x, index = tokens(B, 16), indices(step, B)
    whole = diffusion_mask(x, index, step, 11, cfg, MASK, B)
    halves = [diffusion_mask(x[h], index[h], step, 11, cfg, MASK, B) for h in (slice(0, 4), slice(4, 8))]
    for whole_part, *half_parts in zip(whole, *halves):
        assert torch.equal(whole_part, torch.cat(half_parts))
    loss = diffusion_loss(model, x, index, step, 11, cfg, MASK, B)[0]
    half_losses = [diffusion_loss(model, x[h], index[h], step, 11, cfg, MASK, B)[0] for h in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(loss, sum(half_losses) / 2)
    ar_cfg = AutoregressiveSpec(input_mask_ratio=0.25)
    ar_whole = ar_loss(model, x, index, step, 11, ar_cfg, MASK)[0]
    ar_halves = [ar_loss(model, x[h], index[h], step, 11, ar_cfg, MASK)[0] for h in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(ar_whole, sum(ar_halves) / 2)


def test_masks_are_keyed_by_seed_step_and_sample():
    x, cfg = tokens(8, 32), DiffusionSpec()
    masks = lambda step, seed, index: diffusion_mask(x, index, step, seed, cfg, MASK, 8)[1]
    assert torch.equal(masks(2, 5, indices(2, 8)), masks(2, 5, indices(2, 8)))
    assert not torch.equal(masks(2, 5, indices(2, 8)), masks(3, 5, indices(2, 8)))
    assert not torch.equal(masks(2, 5, indices(2, 8)), masks(2, 6, indices(2, 8)))
    assert not torch.equal(masks(2, 5, indices(2, 8)), masks(2, 5, indices(3, 8)))


def test_antithetic_times_stratify_the_global_batch():
    cfg, B = DiffusionSpec(antithetic=True, eps=0.1), 16
    for step in range(5):
        _, _, t, _ = diffusion_mask(tokens(B, 4), indices(step, B), step, 0, cfg, MASK, B)
        u = (t - 0.1) / 0.9
        assert sorted((u * B).floor().long().tolist()) == list(range(B))


def test_random_length_steps_are_shared_by_every_micro_batch_and_happen_at_the_configured_rate():
    assert all(step_length(0, s, 64, 0.0) == 64 for s in range(100))
    lengths = [step_length(0, s, 64, 1.0) for s in range(300)]
    assert min(lengths) >= 1 and max(lengths) <= 64 and len(set(lengths)) > 30
    cut = [step_length(9, s, 64, 0.2) < 64 for s in range(3000)]
    rate = sum(cut) / len(cut)
    assert rate == pytest.approx(0.2 * 63 / 64, abs=5 * math.sqrt(0.2 * 0.8 / 3000))
    cfg, x = DiffusionSpec(random_length_fraction=1.0), tokens(4, 64)
    step = next(s for s in range(100) if 1 < step_length(2, s, 64, 1.0) < 64)
    _, first = diffusion_loss(UniformModel(), x[:2], indices(step, 4)[:2], step, 2, cfg, MASK, 4)
    _, second = diffusion_loss(UniformModel(), x[2:], indices(step, 4)[2:], step, 2, cfg, MASK, 4)
    assert first["seq_len"] == second["seq_len"] == step_length(2, step, 64, 1.0)


def test_ar_input_masking_replaces_inputs_only():
    x = tokens(16, 33)
    oracle = Oracle(x[:, 1:])
    loss, stats = ar_loss(oracle, x, indices(0, 16), 0, 4, AutoregressiveSpec(input_mask_ratio=0.3), MASK)
    seen = oracle.inputs[0][0]
    replaced = seen == MASK
    assert torch.equal(seen[~replaced], x[:, :-1][~replaced])
    assert replaced.float().mean().item() == pytest.approx(0.3, abs=5 * math.sqrt(0.3 * 0.7 / replaced.numel()))
    assert loss.item() < 1e-6  # targets untouched
    ar_loss(oracle, x, indices(0, 16), 0, 4, AutoregressiveSpec(), MASK)
    assert not (oracle.inputs[1][0] == MASK).any()


def test_objective_dispatch_by_arm():
    model, x, index, objective = tiny_model(), tokens(2, 8), indices(0, 2), ObjectiveSpec()
    dlm = diffusion_loss(model, x, index, 0, 1, objective.diffusion, MASK, 2)[0]
    ar = ar_loss(model, x, index, 0, 1, objective.autoregressive, MASK)[0]
    for arm, expected in (("diffusion", dlm), ("dlm", dlm), ("autoregressive", ar), ("ar", ar)):
        torch.testing.assert_close(objective_loss(arm, model, x, index, 0, 1, objective, MASK, 2)[0], expected)


@pytest.mark.slow
@pytest.mark.parametrize("arm,threshold", [("autoregressive", 0.05), ("diffusion", math.log(V) / 3)])
def test_tiny_model_overfits_a_tiny_pool(arm, threshold):
    """Four random sequences repeated: AR memorises them; DLM's loss falls far below ln V."""
    torch.manual_seed(1)
    model = Transformer(ModelShape(n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ff=128, vocab_size=V, max_seq_len=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch, objective = tokens(4, 16).repeat(8, 1), ObjectiveSpec()
    losses = []
    for step in range(300):
        loss, _ = objective_loss(arm, model, batch, indices(step, 32), step, 0, objective, MASK, 32)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(V)
    assert sum(losses[-25:]) / 25 < threshold
