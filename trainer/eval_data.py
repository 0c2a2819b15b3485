"""Evaluation data: the validation stream in rows, and the continuation-choice examples cut from it."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .corpus import DataError

CHOICE_STREAM = 0x63686F69  # "choi"


def val_batches(val_tokens: np.ndarray, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """The validation stream cut into floor(len / seq_len) rows of seq_len tokens, in order, in
    batches of `batch_size` rows (the last may be smaller): fixed, the same on every call."""
    rows = len(val_tokens) // seq_len
    if rows == 0:
        raise DataError(f"spec.data.validation_tokens: {len(val_tokens)} is less than one sequence (seq_len={seq_len})")
    table = torch.from_numpy(np.asarray(val_tokens[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len))
    return list(table.split(batch_size))


class ChoiceExample(NamedTuple):
    context: list[int]
    candidates: list[list[int]]  # k continuations: the true next chunk and k-1 distractors
    answer: int  # index of the true continuation in `candidates`


def choice_examples(val_tokens: np.ndarray, n: int, k: int, context_tokens: int, continuation_tokens: int, seed: int) -> list[ChoiceExample]:
    """A continuation-choice task from validation text: the validation stream is cut into windows
    of context + continuation tokens; n windows give an example each, whose distractors are the
    continuations of other windows (all k candidates distinct). Deterministic in `seed`."""
    window = context_tokens + continuation_tokens
    windows = len(val_tokens) // window
    if n == 0:
        return []
    if windows < n or windows < k:
        raise DataError(
            f"spec.eval.choice_task.examples: {n} examples of {window} tokens with {k} choices need at least "
            f"{max(n, k)} windows but the validation set has {windows}; raise spec.data.validation_tokens"
        )
    table = np.asarray(val_tokens[: windows * window], dtype=np.int64).reshape(windows, window)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, CHOICE_STREAM])))
    examples = []
    for w in rng.permutation(windows)[:n]:
        true = table[w, context_tokens:].tolist()
        distractors, seen = [], {tuple(true)}
        for other in rng.permutation(windows):
            candidate = table[other, context_tokens:].tolist()
            if other != w and tuple(candidate) not in seen:
                seen.add(tuple(candidate))
                distractors.append(candidate)
                if len(distractors) == k - 1:
                    break
        if len(distractors) < k - 1:
            raise DataError(f"spec.eval.choice_task.choices: the validation set has too few distinct continuations for {k} choices")
        answer = int(rng.integers(k))
        examples.append(ChoiceExample(table[w, :context_tokens].tolist(), distractors[:answer] + [true] + distractors[answer:], answer))
    return examples
