"""Likelihood scoring: exact AR scores, the DLM Monte-Carlo bound, multiple choice and validation loss."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dlmctl.spec import ModelShape
from dlmctl.trainer.models import Transformer
from dlmctl.trainer.sample import ar_generate
from dlmctl.trainer.scoring import (
    ar_loglikelihood, choose, dlm_loglikelihood, loglikelihood, stratified_masks, validation_loss,
)

V, MASK = 40, 39


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    shape = ModelShape(n_layer=2, d_model=32, n_head=4, n_kv_head=4, d_ff=64, vocab_size=V, max_seq_len=32)
    model = Transformer(shape).eval().requires_grad_(False)
    with torch.no_grad():  # sharper than the 0.02 init, so scores differ visibly between tokens
        model.lm_head.weight.mul_(20)
    return model


class Fixed(torch.nn.Module):
    """Logits that do not depend on the input: the same vector at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.shape = ModelShape(n_layer=1, d_model=8, n_head=1, n_kv_head=1, d_ff=8, vocab_size=V, max_seq_len=32)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, *, causal, **kwargs):
        return self.logits.expand(*idx.shape, V).clone()


def ids(n, seed):
    return torch.randint(0, MASK, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


REQUESTS = [(ids(5, 1), ids(3, 2)), (ids(9, 3), ids(1, 4)), (ids(2, 5), ids(6, 6)), (ids(12, 7), ids(4, 8))]


def test_ar_loglikelihood_is_the_exact_sum_of_next_token_log_probabilities():
    model = tiny_model()
    for (context, continuation), (score, _) in zip(REQUESTS, ar_loglikelihood(model, REQUESTS, batch_size=3)):
        seq = torch.tensor([context + continuation])
        logprobs = F.log_softmax(model(seq[:, :-1], causal=True), -1)[0]
        expected = sum(logprobs[len(context) - 1 + i, tok] for i, tok in enumerate(continuation))
        assert score == pytest.approx(float(expected), abs=1e-4)


def test_ar_is_greedy_says_whether_greedy_decoding_reproduces_the_continuation():
    model, context = tiny_model(), ids(6, 9)
    greedy = ar_generate(model, torch.tensor([context]), max_new_tokens=4)[0, 6:].tolist()
    other = greedy[:3] + [(greedy[3] + 1) % MASK]
    (_, hit), (_, miss) = ar_loglikelihood(model, [(context, greedy), (context, other)])
    assert hit and not miss


def test_uniform_model_scores_minus_n_ln_v_for_both_arms():
    uniform = Fixed(torch.zeros(V))
    for arm in ("autoregressive", "diffusion"):
        for (_, continuation), (score, _) in zip(REQUESTS, loglikelihood(uniform, arm, REQUESTS, mask_id=MASK)):
            assert score == pytest.approx(-len(continuation) * math.log(V), abs=1e-4)


def test_dlm_score_of_a_one_token_answer_is_exact():
    model, context, answer = tiny_model(), ids(7, 10), ids(1, 11)
    seq = torch.tensor([context + [MASK]])
    expected = F.log_softmax(model(seq, causal=False), -1)[0, -1, answer[0]]
    [(score, _)] = dlm_loglikelihood(model, [(context, answer)], mask_id=MASK, mc_samples=4)
    assert score == pytest.approx(float(expected), abs=1e-5)


def test_dlm_score_converges_to_the_enumerated_bound():
    """For a 3-token answer, enumerate every masked subset: the bound is -sum_k 1/k mean_{|M|=k} sum_M CE.
    The stratified estimate with m draws per k is within 5 of its standard errors."""
    model, context, answer = tiny_model(), ids(4, 12), ids(3, 13)
    n, m = len(answer), 40
    clean = torch.tensor(context + answer)
    bound, variance = 0.0, 0.0
    for k in range(1, n + 1):
        values = []
        for subset in itertools.combinations(range(n), k):
            noisy = clean.clone()
            positions = [len(context) + i for i in subset]
            noisy[positions] = MASK
            logprobs = F.log_softmax(model(noisy[None], causal=False), -1)[0]
            values.append(float(-logprobs[positions, clean[positions]].sum()))
        values = torch.tensor(values, dtype=torch.float64)
        bound -= float(values.mean()) / k
        variance += float(values.var(unbiased=False)) / k**2 / m
    [(estimate, _)] = dlm_loglikelihood(model, [(context, answer)], mask_id=MASK, mc_samples=n * m, seed=3)
    assert variance > 0
    assert estimate == pytest.approx(bound, abs=5 * math.sqrt(variance))


def test_dlm_scores_use_fixed_seeds_and_do_not_depend_on_batching():
    model = tiny_model()
    together = dlm_loglikelihood(model, REQUESTS, mask_id=MASK, mc_samples=8, seed=5, batch_size=64)
    one_by_one = [dlm_loglikelihood(model, [r], mask_id=MASK, mc_samples=8, seed=5, batch_size=3)[0] for r in REQUESTS]
    for (a, _), (b, _) in zip(together, one_by_one):
        assert a == pytest.approx(b, abs=1e-4)
    other_seed = dlm_loglikelihood(model, REQUESTS, mask_id=MASK, mc_samples=8, seed=6)
    assert any(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(together, other_seed))


def test_stratified_mask_counts_cover_every_count_equally():
    masks, k = stratified_masks(4, 12, torch.Generator().manual_seed(0))
    assert sorted(k.tolist()) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert torch.equal(masks.sum(1), k)


def test_dlm_is_greedy_follows_low_confidence_unmasking():
    target = torch.tensor(ids(10, 14))

    class Oracle(Fixed):
        def forward(self, idx, *, causal, **kwargs):
            return 50.0 * F.one_hot(target[: idx.shape[1]], V).float().expand(idx.shape[0], -1, -1)

    context, answer = target[:6].tolist(), target[6:].tolist()
    wrong = answer[:-1] + [(answer[-1] + 1) % MASK]
    (_, hit), (_, miss) = dlm_loglikelihood(Oracle(torch.zeros(V)), [(context, answer), (context, wrong)],
                                            mask_id=MASK, greedy=True)
    assert hit and not miss


@pytest.mark.parametrize("arm", ["autoregressive", "diffusion"])
def test_choose_picks_the_most_likely_candidate(arm):
    logits = torch.zeros(V)
    logits[7] = 3.0
    candidates = [[3, 3, 3], [7, 7, 7], [5, 7, 5]]
    assert choose(Fixed(logits), arm, [1, 2, 3], candidates, mask_id=MASK, mc_samples=6) == 1
    # A long answer of likely tokens loses on total log-likelihood but wins per token.
    logits[5] = 2.0
    candidates = [[7, 5, 5, 5, 5, 5], [5]]
    assert choose(Fixed(logits), arm, [1, 2], candidates, mask_id=MASK, mc_samples=6) == 1
    assert choose(Fixed(logits), arm, [1, 2], candidates, mask_id=MASK, mc_samples=6, normalize=True) == 0


def validation_batches(n_batches=3, B=4, L=12):
    return [torch.tensor([ids(L, 100 + 10 * b + r) for r in range(B)]) for b in range(n_batches)]


@pytest.mark.parametrize("arm", ["autoregressive", "diffusion"])
def test_validation_loss_of_a_uniform_model_is_ln_v_with_no_error(arm):
    mean, error = validation_loss(Fixed(torch.zeros(V)), arm, validation_batches(), mask_id=MASK, samples=3)
    assert mean == pytest.approx(math.log(V), abs=1e-5)
    assert error == pytest.approx(0.0, abs=1e-6)


def test_ar_validation_loss_is_the_exact_mean_next_token_nll():
    model, batches = tiny_model(), validation_batches()
    nll = torch.cat([F.cross_entropy(model(b[:, :-1], causal=True).transpose(1, 2), b[:, 1:], reduction="none").flatten()
                     for b in batches])
    assert validation_loss(model, "ar", batches) == (pytest.approx(float(nll.mean()), abs=1e-5), 0.0)


def test_dlm_validation_elbo_is_seeded_and_its_standard_error_is_honest():
    model, batches = tiny_model(), validation_batches()
    few = validation_loss(model, "dlm", batches, mask_id=MASK, samples=4, seed=0)
    assert few == validation_loss(model, "dlm", batches, mask_id=MASK, samples=4, seed=0)  # comparable across steps
    assert few[1] > 0
    many = validation_loss(model, "dlm", batches, mask_id=MASK, samples=48, seed=1)
    assert many[1] < few[1]
    assert abs(few[0] - many[0]) < 5 * math.hypot(few[1], many[1])


def test_dlm_validation_elbo_of_one_token_sequences_is_the_exact_cross_entropy():
    model, batch = tiny_model(), torch.tensor([[5], [9], [17]])
    expected = F.cross_entropy(model(torch.full_like(batch, MASK), causal=False)[:, 0], batch[:, 0])
    mean, error = validation_loss(model, "dlm", [batch], mask_id=MASK, samples=2)
    assert mean == pytest.approx(float(expected), abs=1e-5)
    assert error == pytest.approx(0.0, abs=1e-6)
