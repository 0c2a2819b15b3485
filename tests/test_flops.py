"""FLOPs per token (what MFU and compare's FLOPs axis use) against a counted pass: torch's FlopCounterMode
over one forward and backward of the real model.

The convention (PaLM's): every parameter costs 6 FLOPs per token (forward 2, backward 4), the output head's
V x d included even when tied to the embedding; attention's two T x T matmuls cost 3 times their forward
(backward = 2 forward), and a causal (AR) model counts half of them, the lower triangle it needs. The
counter sees only matrix products, so the per-token elementwise weights (the norms) are added as 6 each."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dlmctl.spec import ModelShape
from dlmctl.spec.model import MoEShape
from dlmctl.trainer.models import Transformer, build

SHAPES = {
    "mha-untied": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ff=96, tie_embeddings=False),
    "gqa-tied-qknorm": dict(n_layer=3, d_model=64, n_head=8, n_kv_head=2, d_ff=160, tie_embeddings=True,
                            qk_norm=True),
    # dropless top-2 of 4 experts: each token runs 2 experts' matmuls and the router's, so the count is of
    # the active parameters; the 2 idle experts per block must not be counted
    "moe-top2-of-4": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, tie_embeddings=False,
                          variant="moe", moe=MoEShape(experts=4, top_k=2, expert_d_ff=48)),
}


def counted(model: Transformer, batch: int, seq_len: int, causal: bool) -> tuple[float, float]:
    """(matrix-product FLOPs, attention forward FLOPs) per token of one training step's forward + backward."""
    idx = torch.randint(0, model.shape.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(idx, causal=causal).float().square().mean().backward()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    attention_forward = sum(f for op, f in by_op.items() if "scaled_dot_product" in op and "backward" not in op)
    attention_backward = sum(f for op, f in by_op.items() if "scaled_dot_product" in op and "backward" in op)
    matmuls = counter.get_total_flops() - attention_forward - attention_backward
    assert attention_forward > 0 and matmuls > 0, f"the counter saw no attention or no matmul: {by_op}"
    tokens = batch * seq_len
    return matmuls / tokens, attention_forward / tokens


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_flops_per_token_match_a_counted_training_step(name, causal):
    torch.manual_seed(0)
    seq_len = 32
    model = build(ModelShape(vocab_size=97, max_seq_len=seq_len, **SHAPES[name]))
    matmuls, attention = counted(model, batch=2, seq_len=seq_len, causal=causal)
    elementwise = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # norm weights: no matmul
    attention_share = 0.5 if causal else 1.0
    assert model.flops_per_token(seq_len, causal=causal) == pytest.approx(
        matmuls + 6 * elementwise + 3 * attention * attention_share, rel=1e-12)


def test_the_attention_term_grows_with_the_sequence_and_the_rest_does_not():
    torch.manual_seed(0)
    model = Transformer(ModelShape(vocab_size=97, max_seq_len=64, **SHAPES["mha-untied"]))
    short, long = (counted(model, batch=1, seq_len=t, causal=False) for t in (16, 64))
    assert short[0] == pytest.approx(long[0], rel=1e-12), "matmul FLOPs per token do not depend on T"
    assert long[1] == pytest.approx(4 * short[1], rel=1e-12), "attention FLOPs per token are linear in T"
    assert model.flops_per_token(64) - model.flops_per_token(16) == pytest.approx(3 * (long[1] - short[1]))


def test_a_mixture_of_experts_costs_its_active_parameters_not_all_of_them():
    torch.manual_seed(0)
    shape = ModelShape(vocab_size=97, max_seq_len=32, **SHAPES["moe-top2-of-4"])
    model = build(shape)
    idle = shape.n_layer * (4 - 2) * 3 * 64 * 48  # two experts per block a token does not use
    assert model.num_params() - model.active_params() == idle
    assert model.flops_per_token(32) == pytest.approx(
        6 * (model.num_params(exclude_embeddings=True) - idle + 97 * 64) + 12 * 2 * 64 * 32, rel=1e-12)
