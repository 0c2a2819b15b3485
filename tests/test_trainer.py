"""The real trainer, end to end: both arms learn, N processes reproduce 1 process, exports load back."""
import json
import math

import pytest
import torch

from trainer_runs import events, launch, losses, start_pods, tiny_run, trains_and_learns, wait_for_pods

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arm", ["diffusion", "autoregressive"])
def test_a_run_trains_evaluates_checkpoints_and_exports(tmp_path, arm):
    run = tiny_run(arm, data={"epochs": 4})
    out = tmp_path / "out"
    final_eval = trains_and_learns(run, out)
    steps = run.spec.total_steps
    examples = run.spec.eval.choice_task.examples
    assert (final_eval["choice_accuracy"] * examples).is_integer(), "a share of the choice examples"
    if arm == "diffusion":
        assert final_eval["val_loss_stderr"] > 0, "the ELBO is a Monte-Carlo estimate with an error"
    [done] = events(out, "done")
    assert done["epoch"] == pytest.approx(4.0)

    from dlmctl.trainer.export import load_export
    from dlmctl.trainer.runs import build_model

    data = json.loads((out / "data.json").read_text())
    model = build_model(run, data["vocab_size"])
    causal, bidirectional = (model.flops_per_token(run.spec.data.seq_len, causal=c) for c in (True, False))
    assert causal < bidirectional  # AR attention computes the lower triangle only
    per_token = causal if arm == "autoregressive" else bidirectional
    tokens = steps * run.spec.global_batch_sequences * run.spec.data.seq_len
    assert final_eval["flops"] == pytest.approx(per_token * tokens, rel=1e-12)
    bits = final_eval["val_loss"] * data["validation_tokens"] / data["validation_bytes"] / math.log(2)
    assert final_eval["val_bits_per_byte"] == pytest.approx(bits)

    model, tokenizer, loaded_arm = load_export(out / "export")
    assert loaded_arm.value == arm
    if arm == "autoregressive":  # the final evaluation scored the exported weights: recount it by hand
        assert final_eval["choice_accuracy"] == choice_accuracy_by_hand(model, run)
    ids = torch.tensor([tokenizer.encode("def main():\n    return")])
    assert model(ids, causal=arm == "autoregressive").shape[-1] == model.shape.vocab_size


def choice_accuracy_by_hand(model, run) -> float:
    """AR continuation choice: the candidate whose tokens the model gives the highest summed log-probability,
    read off one causal forward over context + candidate."""
    import os

    from dlmctl.trainer.data import prepare_data

    task = run.spec.eval.choice_task
    data = prepare_data(run.spec.data, run.spec.seed, os.environ["DLMCTL_CACHE"])  # the trainer's (conftest's)
    correct = 0
    for example in data.choice_examples(task.examples, task.choices, task.context_tokens, task.continuation_tokens):
        scores = []
        for candidate in example.candidates:
            ids = torch.tensor([list(example.context) + list(candidate)])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids, causal=True).float(), dim=-1)[0]
            start = len(example.context)
            scores.append(sum(logprobs[start + i - 1, token].item() for i, token in enumerate(candidate)))
        correct += max(range(len(scores)), key=scores.__getitem__) == example.answer
    return correct / task.examples


@pytest.mark.parametrize("zero_stage,packing", [(1, "fixed"), (2, "fixed"), (1, "per-epoch")])
def test_two_processes_give_the_loss_curve_of_one(tmp_path, zero_stage, packing):
    run = tiny_run("diffusion", deepspeed={"zero_stage": zero_stage}, data={"packing": packing})
    launch(run, tmp_path / "one", processes=1)
    launch(run, tmp_path / "two", processes=2)

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), f"step {step}"


def test_the_environment_a_pytorchjob_injects_is_enough_without_torchrun(tmp_path):
    """A PyTorchJob without torchrun gives each pod MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK only."""
    run = tiny_run("autoregressive")
    launch(run, tmp_path / "torchrun", processes=1)
    outputs = [tmp_path / "pod0", tmp_path / "pod1"]
    wait_for_pods(start_pods(run, outputs), outputs)

    one, two = losses(tmp_path / "torchrun"), losses(tmp_path / "pod0")
    assert sorted(one) == sorted(two)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5)
