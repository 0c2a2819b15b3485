"""packing: per-epoch (Megatron's data order): every epoch re-packs the unique pool's documents into new
windows, holds the same tokens, and depends on (seed, global sample index) alone."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from trainer_runs import step_tokens

from dlmctl.spec.sections import DataSpec
from dlmctl.trainer.data import DataError, prepare_data
from dlmctl.trainer.sampler import RepackedBatches, TrainBatches

EOS = 0


def document_pool(lengths: list[int], cut: int = 0) -> np.ndarray:
    """Documents of the given lengths (text tokens), each followed by EOS, then `cut` tokens of one more
    document without its EOS (the pool's cut last document). Text tokens count up 1, 2, 3, ... across the
    whole pool, so every text token is unique and, within a document, each is its predecessor + 1."""
    parts, next_token = [], 1
    for n in lengths:
        parts += list(range(next_token, next_token + n)) + [EOS]
        next_token += n
    parts += list(range(next_token, next_token + cut))
    return np.array(parts, dtype=np.uint16)


def epoch_rows(batches: RepackedBatches, epoch: int) -> np.ndarray:
    n = batches.num_sequences
    return batches.rows(np.arange(epoch * n, (epoch + 1) * n))



LENGTHS = [5, 17, 3, 9, 30, 1, 12, 7, 22, 4, 11, 6, 14, 2, 19]
POOL = document_pool(LENGTHS, cut=8)  # 177 whole-document tokens (162 text + 15 EOS) + 8 cut: 185
SEQ_LEN = 12  # 15 windows per epoch, 5 tokens left out of each


def test_every_epoch_holds_the_pools_tokens_less_a_tail_shorter_than_a_window():
    batches = RepackedBatches(POOL, EOS, SEQ_LEN, seed=1)
    assert batches.num_sequences == len(POOL) // SEQ_LEN == 15
    pool = Counter(POOL.tolist())
    for epoch in range(5):
        seen = Counter(epoch_rows(batches, epoch).ravel().tolist())
        assert not seen - pool, "an epoch holds only pool tokens, none twice more than the pool does"
        assert sum((pool - seen).values()) == len(POOL) % SEQ_LEN == 5
        # the cut document (8 tokens, no EOS) closes every epoch's stream, so the 5 tokens left out
        # are its last 5, as with fixed packing: every epoch holds the same tokens
        assert pool - seen == Counter(POOL[-5:].tolist())


def test_windows_are_runs_of_whole_documents_in_order():
    batches = RepackedBatches(POOL, EOS, SEQ_LEN, seed=2)
    for epoch in range(3):
        for window in epoch_rows(batches, epoch).tolist():
            for a, b in zip(window, window[1:]):
                # inside a document tokens count up by one; a document ends with EOS, then another begins
                assert a == EOS or b in (a + 1, EOS), window


def test_window_boundaries_move_between_epochs():
    batches = RepackedBatches(POOL, EOS, SEQ_LEN, seed=3)
    windows = [set(map(tuple, epoch_rows(batches, e).tolist())) for e in range(3)]
    assert windows[0] != windows[1] and windows[1] != windows[2]
    # the fixed packing's windows are the same set every epoch: the pool cut once
    fixed = TrainBatches(POOL[: 15 * SEQ_LEN].reshape(15, SEQ_LEN), seed=3)
    cut_once = set(map(tuple, fixed.sequences.tolist()))
    assert all(set(map(tuple, fixed.rows(np.arange(e * 15, e * 15 + 15)).tolist())) == cut_once for e in range(3))


def test_the_same_seed_gives_the_same_samples_and_another_seed_others():
    first, again = RepackedBatches(POOL, EOS, SEQ_LEN, seed=4), RepackedBatches(POOL, EOS, SEQ_LEN, seed=4)
    samples = np.array([40, 3, 17, 16, 0, 29, 100])  # any order, across epochs
    assert np.array_equal(first.rows(samples), again.rows(samples))
    assert np.array_equal(first.rows(samples)[2], again.rows(np.array([17]))[0]), "a sample does not depend on its batch"
    other = RepackedBatches(POOL, EOS, SEQ_LEN, seed=5)
    assert not np.array_equal(epoch_rows(first, 0), epoch_rows(other, 0))


@pytest.mark.parametrize("world,micro_batch", [(2, 2), (4, 1), (2, 1), (1, 4)])
def test_a_step_holds_the_same_sequences_on_any_world_size_and_micro_batch_layout(world, micro_batch):
    batches = RepackedBatches(POOL, EOS, SEQ_LEN, seed=6)
    for step in range(12):  # 15 windows per epoch, 8 per step: steps straddle epoch boundaries
        one = step_tokens(batches, step, world=1, micro_batch=8, global_batch=8)
        assert np.array_equal(one, step_tokens(batches, step, world, micro_batch, global_batch=8))


def test_resuming_mid_epoch_continues_the_same_stream_on_another_world_size():
    uninterrupted = RepackedBatches(POOL, EOS, SEQ_LEN, seed=7)
    expected = [step_tokens(uninterrupted, s, 1, 4, 4) for s in range(10)]
    before = RepackedBatches(POOL, EOS, SEQ_LEN, seed=7)
    for s in range(5):  # 20 samples: a third of the way into epoch 1
        before.step_done(s, 4)
    state = before.state_dict()
    after = RepackedBatches(POOL, EOS, SEQ_LEN, seed=7)
    after.load_state_dict(state)
    start = after.resume_step(4)
    assert start == 5 and after.epoch_at() == pytest.approx(20 / 15)
    assert all(np.array_equal(step_tokens(after, s, 2, 1, 4), expected[s]) for s in range(start, 10))

    with pytest.raises(DataError, match=r"^spec.data.packing: the checkpoint was trained with packing per-epoch"):
        TrainBatches(POOL[:180].reshape(15, SEQ_LEN), seed=7).load_state_dict(state)
    with pytest.raises(DataError, match=r"^spec.data: the checkpoint was trained on other data"):
        RepackedBatches(POOL, EOS, SEQ_LEN + 1, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match=r"^spec.seed"):
        RepackedBatches(POOL, EOS, SEQ_LEN, seed=8).load_state_dict(state)


def test_a_fixed_checkpoint_without_a_packing_field_still_resumes_fixed():
    fixed = TrainBatches(POOL[:180].reshape(15, SEQ_LEN), seed=0)
    fixed.step_done(2, 4)
    old_state = {k: v for k, v in fixed.state_dict().items() if k != "packing"}
    resumed = TrainBatches(POOL[:180].reshape(15, SEQ_LEN), seed=0)
    resumed.load_state_dict(old_state)
    assert resumed.resume_step(4) == 3
    with pytest.raises(DataError, match=r"^spec.data.packing"):
        RepackedBatches(POOL, EOS, SEQ_LEN, seed=0).load_state_dict(old_state)


def test_a_pool_ending_on_a_whole_document_moves_its_tail_between_epochs():
    pool = document_pool(LENGTHS)  # no cut document: every document takes part in the shuffle
    batches = RepackedBatches(pool, EOS, SEQ_LEN, seed=9)
    full = Counter(pool.tolist())
    left_out = [full - Counter(epoch_rows(batches, e).ravel().tolist()) for e in range(6)]
    assert all(not Counter(epoch_rows(batches, e).ravel().tolist()) - full for e in range(6))
    assert all(sum(c.values()) == len(pool) % SEQ_LEN for c in left_out)
    assert len({tuple(sorted(c.elements())) for c in left_out}) > 1


def test_prepared_data_packs_per_epoch_from_the_same_pool_as_fixed(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}: " + "word " * (10 + i * 3))
    spec = DataSpec(train=str(folder), unique_tokens=3000, validation_tokens=600, seq_len=32,
                    tokenizer={"kind": "byte"})
    fixed = prepare_data(spec, 0, tmp_path / "cache")
    repacked = prepare_data(spec.model_copy(update={"packing": "per-epoch"}), 0, tmp_path / "cache")
    assert repacked.metadata["cache_hit"] and repacked.metadata["cache_key"] == fixed.metadata["cache_key"]
    assert isinstance(fixed.train_batches(), TrainBatches) and fixed.metadata["packing"] == "fixed"
    batches = repacked.train_batches()
    assert isinstance(batches, RepackedBatches) and repacked.metadata["packing"] == "per-epoch"
    assert len(repacked.pool) == 3000 and batches.num_sequences == 3000 // 32 == len(fixed.train)
    pool = Counter(np.asarray(repacked.pool).tolist())
    for epoch in range(3):
        seen = Counter(epoch_rows(batches, epoch).ravel().tolist())
        assert not seen - pool and sum((pool - seen).values()) == 3000 % 32
    eos = repacked.tokenizer.eos_id
    for window in epoch_rows(batches, 1).tolist():  # whole-document runs: text between EOS is a document's text
        for piece in bytes(t for t in window if t != eos).split(b"document ")[1:-1]:
            number, words = piece.split(b": ")
            assert words == b"word " * (10 + int(number) * 3)
