"""Periodic evaluation of a run: validation loss (AR NLL / DLM ELBO ± s.e.) in nats per token and in bits per
byte, and continuation-choice accuracy ± its binomial standard error.

Every rank evaluates the same fixed set (ZeRO-3 needs every rank in each forward); rank 0 reports.
Seeds are fixed, so the DLM's Monte-Carlo numbers are comparable from step to step.
"""
from __future__ import annotations

import math

from dlmctl.spec import Run

from .scoring import loglikelihood, validation_loss

EVAL_SEED_OFFSET = 0x5EED


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """A loss in nats per token as bits per byte of text: loss × (tokens / bytes) / ln 2."""
    return loss / (bytes_per_token * math.log(2))


def binomial_stderr(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on n independent examples: sqrt(a (1 - a) / n)."""
    return math.sqrt(accuracy * (1 - accuracy) / n)


class Evaluator:
    """`run(model)` gives val_loss, val_loss_stderr, val_bits_per_byte and, with a choice task,
    choice_accuracy and choice_accuracy_stderr.

    Bits per byte use the bytes per token of the whole validation set (`validation_bytes_per_token` of
    the data's metadata: UTF-8 bytes of the text the validation tokens encode, end-of-document tokens
    counting 0, over the number of tokens), measured once when the data is prepared; the loss is
    measured on the first `spec.eval.batches` batches of that set."""

    def __init__(self, run: Run, data):
        spec = run.spec
        self.arm = run.arm
        self.mask_id = data.tokenizer.mask_id
        self.cfg = spec.eval
        self.seed = spec.seed + EVAL_SEED_OFFSET
        self.bytes_per_token = data.metadata.get("validation_bytes_per_token")
        self.batches = data.val_batches(spec.batch.micro_batch_sequences, spec.data.seq_len)[: spec.eval.batches]
        task = spec.eval.choice_task
        self.examples = (data.choice_examples(task.examples, task.choices, task.context_tokens,
                                              task.continuation_tokens) if task.examples else [])

    def run(self, model) -> dict:
        loss, stderr = validation_loss(model, self.arm, self.batches, mask_id=self.mask_id,
                                       samples=self.cfg.elbo_samples, seed=self.seed)
        result = {"val_loss": loss, "val_loss_stderr": stderr}
        if self.bytes_per_token:
            result["val_bits_per_byte"] = bits_per_byte(loss, self.bytes_per_token)
        if self.examples:
            accuracy = self.choice_accuracy(model)
            result["choice_accuracy"] = accuracy
            result["choice_accuracy_stderr"] = binomial_stderr(accuracy, len(self.examples))
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
