"""Periodic evaluation of a run: validation loss (AR NLL / DLM ELBO ± s.e.) and continuation-choice accuracy.

Every rank evaluates the same fixed set (ZeRO-3 needs every rank in each forward); rank 0 reports.
Seeds are fixed, so the DLM's Monte-Carlo numbers are comparable from step to step.
"""
from __future__ import annotations

from dlmctl.spec import Run

from .scoring import loglikelihood, validation_loss

EVAL_SEED_OFFSET = 0x5EED


class Evaluator:
    def __init__(self, run: Run, data):
        spec = run.spec
        self.arm = run.arm
        self.mask_id = data.tokenizer.mask_id
        self.cfg = spec.eval
        self.seed = spec.seed + EVAL_SEED_OFFSET
        self.batches = data.val_batches(spec.batch.micro_batch_sequences, spec.data.seq_len)[: spec.eval.batches]
        task = spec.eval.choice_task
        self.examples = (data.choice_examples(task.examples, task.choices, task.context_tokens,
                                              task.continuation_tokens) if task.examples else [])

    def run(self, model) -> dict:
        loss, stderr = validation_loss(model, self.arm, self.batches, mask_id=self.mask_id,
                                       samples=self.cfg.elbo_samples, seed=self.seed)
        result = {"val_loss": loss, "val_loss_stderr": stderr}
        if self.examples:
            result["choice_accuracy"] = self.choice_accuracy(model)
        return result

    def choice_accuracy(self, model) -> float:
        """Pick the true next chunk among distractors by (summed) continuation log-likelihood."""
        requests = [(ex.context, cand) for ex in self.examples for cand in ex.candidates]
        scores = [s for s, _ in loglikelihood(model, self.arm, requests, mask_id=self.mask_id,
                                                 mc_samples=self.cfg.mc_samples, seed=self.seed, batch_size=64)]
        correct, i = 0, 0
        for ex in self.examples:
            k = len(ex.candidates)
            chunk = scores[i:i + k]
            correct += max(range(k), key=chunk.__getitem__) == ex.answer
            i += k
        return correct / len(self.examples)
