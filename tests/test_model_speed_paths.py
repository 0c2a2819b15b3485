"""The fast paths compute the same function: RoPE from prebuilt tables, torch.compile per block, fused AdamW and
no gradient all-reduce in one process. Speed itself is measured by benchmarks/bench_model.py, not here."""
import copy
import os

import pytest
import torch
import torch.distributed as dist

from dlmctl.spec import ModelShape
from dlmctl.trainer.engine import apply_compile, build_engine, compiles, init_distributed, lr_lambda
from dlmctl.trainer.models.dense import Transformer, apply_rope, rope_tables
from trainer_runs import tiny_run


def shape(**overrides) -> ModelShape:
    fields = dict(n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64, vocab_size=64, max_seq_len=24)
    return ModelShape(**(fields | overrides))


def test_rope_rotates_each_pair_of_halves_by_position_times_frequency():
    """Oracle: the pair (x[i], x[i + D/2]) as the complex number x[i] + j x[i + D/2], times e^(j p theta^(-2i/D))."""
    B, H, T, D, theta = 2, 3, 20, 16, 500.0
    x = torch.randn(B, H, T, D, dtype=torch.float64)
    frequencies = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rotation = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T)[:, None] * frequencies)
    rotated = torch.complex(x[..., :D // 2], x[..., D // 2:]) * rotation
    expected = torch.cat((rotated.real, rotated.imag), -1)
    cos, sin = rope_tables(T, D, theta)
    torch.testing.assert_close(apply_rope(x.float(), cos, sin).double(), expected, atol=1e-5, rtol=1e-5)


def test_rope_tables_follow_the_model_dtype_and_stay_out_of_the_state_dict():
    model = Transformer(shape()).to(torch.bfloat16)
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.bfloat16
    assert not any(key.startswith("rope_") for key in model.state_dict())
    q = torch.randn(1, 2, 24, 8, dtype=torch.bfloat16)
    assert apply_rope(q, model.rope_cos, model.rope_sin).dtype == torch.bfloat16


def test_a_compiled_model_gives_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    eager = Transformer(shape())
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    idx = torch.randint(0, 64, (2, 24))
    for causal in (True, False):
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(idx, causal=causal).flatten(0, 1), idx.flatten())
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compile_is_on_by_default_only_with_cuda_and_never_under_zero3():
    cpu, cuda = (type("W", (), {"device": torch.device(d)})() for d in ("cpu", "cuda"))
    assert not compiles(tiny_run().spec, cpu) and compiles(tiny_run().spec, cuda)
    assert compiles(tiny_run(model={"preset": "nano", "compile": True}).spec, cpu)
    assert not compiles(tiny_run(model={"preset": "nano", "compile": False}).spec, cuda)
    assert not compiles(tiny_run(deepspeed={"zero_stage": 3}, model={"preset": "nano", "compile": True}).spec, cpu)


DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def one_process():
    """A process group in this process, and afterwards the environment as it was: the variables
    init_distributed sets (a rendezvous port this process held) must not reach later tests' trainers."""
    saved = {name: os.environ.pop(name, None) for name in DISTRIBUTED_ENV}
    try:
        yield init_distributed()
    finally:
        dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_one_process_steps_like_plain_adamw_without_an_all_reduce(one_process):
    """Oracle: torch's reference (for-loop) AdamW with the same groups, clipping and schedule."""
    run = tiny_run("autoregressive", optimizer={"lr": 3e-3, "grad_clip": 0.05, "weight_decay": 0.1})
    spec = run.spec
    torch.manual_seed(0)
    model = Transformer(shape())
    reference = copy.deepcopy(model)
    engine, _ = build_engine(model, spec, one_process, total_steps=10)
    assert not engine.enable_backward_allreduce
    assert engine.optimizer.defaults["fused"]

    o = spec.optimizer
    matrices = [p for p in reference.parameters() if p.dim() >= 2]
    vectors = [p for p in reference.parameters() if p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": matrices, "weight_decay": o.weight_decay},
                               {"params": vectors, "weight_decay": 0.0}],
                              lr=o.lr * lr_lambda(spec, 10)(0), betas=o.betas, eps=o.eps, foreach=False, fused=False)
    idx = torch.randint(0, 64, (spec.batch.micro_batch_sequences, 24))
    accumulation = spec.global_batch_sequences // spec.batch.micro_batch_sequences
    for _ in range(accumulation):
        loss = torch.nn.functional.cross_entropy(engine(idx, causal=True).flatten(0, 1), idx.flatten())
        engine.backward(loss)
        engine.step()
        (torch.nn.functional.cross_entropy(reference(idx, causal=True).flatten(0, 1), idx.flatten())
         / accumulation).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), o.grad_clip)
    adamw.step()
    for (name, p), q in zip(reference.named_parameters(), engine.module.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)
