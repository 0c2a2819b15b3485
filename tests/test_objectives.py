"""The masked-diffusion and autoregressive objectives: their expectations, masking statistics,
label conventions, random lengths and rank-independent randomness."""
import math

import pydantic
import pytest
import torch

from dlmctl.spec import ModelShape
from dlmctl.spec.sections import AutoregressiveSpec, DiffusionSpec, ObjectiveSpec
from dlmctl.trainer.models import Transformer
from dlmctl.trainer.objectives import (
    ar_input_mask, ar_loss, diffusion_loss, diffusion_mask, keyed_uniforms, mask_probability, objective_loss,
    sequence_lengths,
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
    x, model = tokens(4, 12), tiny_model()
    for cfg in (DiffusionSpec(), DiffusionSpec(eps=1e-3, loss_weight="sampled")):
        noisy, masked, _, p = diffusion_mask(x, indices(5, 4), 5, 1, cfg, MASK, 4)
        ce = torch.nn.functional.cross_entropy(model(noisy, causal=False).transpose(1, 2), x, reduction="none")
        realized = masked.float().mean(1, keepdim=True)
        weight = realized if cfg.loss_weight == "realized" else p[:, None].float()
        expected = (ce * masked / weight).sum() / (4 * 12)
        loss, stats = diffusion_loss(model, x, indices(5, 4), 5, 1, cfg, MASK, 4)
        torch.testing.assert_close(loss, expected)
        assert stats["mask_ratio"].item() == pytest.approx(realized.mean().item())


def test_the_spec_rejects_the_sampled_weight_without_eps():
    with pytest.raises(pydantic.ValidationError, match="loss_weight.*eps"):
        DiffusionSpec(loss_weight="sampled", eps=0.0)


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


def cut_batch(B=8, L=32, fraction=0.5, seed=2):
    """A step whose micro-batch holds full rows and rows cut strictly inside (1 < l < L)."""
    for step in range(100):
        lengths = sequence_lengths(seed, step, indices(step, B), L, fraction)
        if (lengths == L).any() and ((lengths > 1) & (lengths < L)).sum() >= 2:
            return step, lengths
    raise AssertionError("no step mixes full and cut rows")


def test_random_lengths_cut_the_configured_fraction_of_sequences_uniformly():
    L, n = 64, 64_000
    index = torch.arange(n)
    assert torch.equal(sequence_lengths(9, 4, index, L, 0.0), torch.full((n,), L))
    # A cut sequence draws l ~ U{1..L}: it is shorter than L with probability fraction * (L - 1) / L.
    lengths = sequence_lengths(9, 4, index, L, 0.2)
    rate = (lengths < L).double().mean().item()
    assert rate == pytest.approx(0.2 * (L - 1) / L, abs=5 * math.sqrt(0.2 * 0.8 / n))
    everything_cut = sequence_lengths(9, 5, index, L, 1.0)
    assert everything_cut.min() >= 1 and everything_cut.max() <= L
    counts = torch.bincount(everything_cut - 1, minlength=L).double()
    assert chi_square(counts, torch.full((L,), n / L)) < chi_square_bound(L - 1)
    # Keyed by sample and step: other samples or steps are cut independently.
    again = sequence_lengths(9, 4, index, L, 0.2)
    assert torch.equal(lengths, again)
    other_step = sequence_lengths(9, 6, index, L, 0.2)
    both = ((lengths < L) & (other_step < L)).double().mean().item()
    assert both == pytest.approx(rate ** 2, abs=5 * math.sqrt(rate ** 2 / n))


def test_a_cut_row_trains_exactly_as_its_prefix_run_alone():
    """The oracle: each row on its own, cut rows truncated to their length, with random lengths off."""
    cfg, model, B, L = DiffusionSpec(random_length_fraction=0.5), tiny_model(), 8, 32
    step, lengths = cut_batch(B, L)
    x, index = tokens(B, L, step), indices(step, B)
    loss, stats = diffusion_loss(model, x, index, step, 2, cfg, MASK, B)
    uncut = cfg.model_copy(update={"random_length_fraction": 0.0})
    alone = [diffusion_loss(model, x[r:r + 1, :l], index[r:r + 1], step, 2, uncut, MASK, B)[0]
             for r, l in enumerate(lengths.tolist())]
    torch.testing.assert_close(loss, torch.stack(alone).mean())
    assert stats["cut_rows"] == int((lengths < L).sum())
    # The forward process of a cut row is that of its prefix: never masked at or past l, ratio masked / l.
    _, masked, _, _ = diffusion_mask(x, index, step, 2, cfg, MASK, B, lengths)
    for r, l in enumerate(lengths.tolist()):
        prefix = diffusion_mask(x[r:r + 1, :l], index[r:r + 1], step, 2, uncut, MASK, B)[1][0]
        assert torch.equal(masked[r, :l], prefix) and not masked[r, l:].any()


def test_positions_past_a_cut_change_neither_the_loss_nor_the_gradients():
    cfg, B, L = DiffusionSpec(random_length_fraction=0.5), 8, 32
    step, lengths = cut_batch(B, L)
    x, index = tokens(B, L, step), indices(step, B)
    perturbed = x.clone()
    beyond = torch.arange(L) >= lengths[:, None]
    shift = 1 + torch.randint(0, MASK - 1, x.shape, generator=torch.Generator().manual_seed(3))
    perturbed[beyond] = (x[beyond] + shift[beyond]) % MASK  # a different token at every position past the cut
    assert (perturbed != x).any(1).sum() >= 2

    def loss_and_grads(batch):
        model = tiny_model()
        loss = diffusion_loss(model, batch, index, step, 2, cfg, MASK, B)[0]
        loss.backward()
        return loss, [p.grad for p in model.parameters()]

    (loss, grads), (perturbed_loss, perturbed_grads) = loss_and_grads(x), loss_and_grads(perturbed)
    torch.testing.assert_close(perturbed_loss, loss)
    for a, b in zip(grads, perturbed_grads):
        torch.testing.assert_close(a, b)


def test_random_lengths_do_not_depend_on_how_the_global_batch_is_split():
    cfg, model, B, L = DiffusionSpec(random_length_fraction=0.5), tiny_model(), 8, 32
    step, lengths = cut_batch(B, L)
    x, index = tokens(B, L, step), indices(step, B)
    whole = diffusion_loss(model, x, index, step, 2, cfg, MASK, B)[0]
    for parts in (2, 4):  # two ranks, or micro-batches of two rows
        pieces = [(x[i::parts], index[i::parts]) for i in range(parts)]  # interleaved: rank r gets rows r, r+parts, ...
        assert torch.equal(torch.cat([sequence_lengths(2, step, i, L, 0.5) for _, i in pieces]),
                           torch.cat([lengths[i::parts] for i in range(parts)]))
        losses = [diffusion_loss(model, xs, ids, step, 2, cfg, MASK, B)[0] for xs, ids in pieces]
        torch.testing.assert_close(torch.stack(losses).mean(), whole)


def test_the_fallback_position_of_a_cut_row_is_uniform_within_its_length():
    """Rows with exactly one masked token (drawn or the fallback): its position is uniform over [0, l)."""
    cfg, B, L, l = DiffusionSpec(), 4096, 16, 5
    counts = torch.zeros(L)
    for step in range(3):
        x = tokens(B, L, step)
        _, masked, _, _ = diffusion_mask(x, indices(step, B), step, 0, cfg, MASK, B, torch.full((B,), l))
        assert masked[:, :l].any(1).all() and not masked[:, l:].any()
        single = masked[masked.sum(1) == 1]
        counts += single.sum(0)
    assert counts[l:].sum() == 0 and counts.sum() > 2000
    assert chi_square(counts[:l], torch.full((l,), counts.sum() / l)) < chi_square_bound(l - 1)


def chi_square(observed, expected) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def chi_square_bound(dof: int) -> float:
    """Mean + 5 standard deviations of a chi-square with `dof` degrees of freedom: the draws are keyed,
    so this is a fixed outcome rather than a flaky one, and a biased generator lands far above it."""
    return dof + 5 * math.sqrt(2 * dof)


def test_keyed_uniforms_are_uniform_and_uncorrelated_across_positions_samples_steps_and_seeds():
    n_samples, n_positions = 512, 512
    u = keyed_uniforms(7, 3, torch.arange(n_samples), "diffusion-mask", n_positions)
    assert u.dtype == torch.float64 and u.shape == (n_samples, n_positions)
    # Kolmogorov-Smirnov against U(0, 1); 1.95 / sqrt(n) is the 0.1% critical value.
    flat = u.flatten().sort().values
    n = flat.numel()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = max((grid - flat).max().item(), (flat - (grid - 1 / n)).max().item())
    assert ks < 1.95 / math.sqrt(n)
    # Neighbouring positions, samples, steps and seeds: correlation ~ N(0, 1/n), and pairs fill the unit
    # square uniformly (a 16 x 16 chi-square catches dependence a correlation misses).
    pairs = {
        "positions": (u[:, :-1], u[:, 1:]),
        "samples": (u[:-1], u[1:]),
        "steps": (u, keyed_uniforms(7, 4, torch.arange(n_samples), "diffusion-mask", n_positions)),
        "seeds": (u, keyed_uniforms(8, 3, torch.arange(n_samples), "diffusion-mask", n_positions)),
        "streams": (u, keyed_uniforms(7, 3, torch.arange(n_samples), "ar-input-mask", n_positions)),
    }
    for name, (a, b) in pairs.items():
        a, b = a.flatten(), b.flatten()
        correlation = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
        assert abs(correlation) < 5 / math.sqrt(a.numel()), name
        cells = torch.bincount((a * 16).long() * 16 + (b * 16).long(), minlength=256).double()
        assert chi_square(cells, torch.full((256,), a.numel() / 256)) < chi_square_bound(255), name


def test_keyed_uniforms_of_a_sample_are_its_own_and_a_shorter_row_is_a_prefix():
    whole = keyed_uniforms(1, 2, torch.tensor([5, 9, 11]), "s", 40)
    assert torch.equal(keyed_uniforms(1, 2, torch.tensor([9]), "s", 40)[0], whole[1])
    assert torch.equal(keyed_uniforms(1, 2, torch.tensor([11, 5]), "s", 7), whole[[2, 0], :7])


def test_keyed_bernoulli_draws_are_the_uniforms_below_each_rows_probability():
    index, p = torch.arange(40), torch.linspace(0, 1, 40, dtype=torch.float64)
    u = keyed_uniforms(3, 1, index, "s", 300)
    assert torch.equal(keyed_uniforms(3, 1, index, "s", 300, below=p), u < p[:, None])


def test_ar_input_mask_rate_and_keys():
    x, index = tokens(64, 256), indices(2, 64)
    masked = ar_input_mask(x, index, 2, 4, 0.3)
    assert masked.float().mean().item() == pytest.approx(0.3, abs=5 * math.sqrt(0.3 * 0.7 / masked.numel()))
    assert torch.equal(ar_input_mask(x[10:12], index[10:12], 2, 4, 0.3), masked[10:12])
    assert not torch.equal(ar_input_mask(x, index, 3, 4, 0.3), masked)


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
