"""One tokenizer per experiment: the BPE is trained on the first `tokenizer.training_bytes` bytes of the
training source in hash order, whatever `unique_tokens` is, and never on validation text; so the sweep
points of an experiment share it and their per-token losses compare."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dlmctl.spec.sections import DataSpec
from dlmctl.trainer.data import prepare_data
from dlmctl.trainer.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def write_corpus(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        text = f"doc {i}: " + " ".join(WORDS[(i * 5 + j * j * 3) % len(WORDS)] for j in range(25 + i % 23)) + " é€.\n"
        (folder / f"{i:03d}.txt").write_text(text)
        texts.append(text)
    return texts


def in_hash_order(texts: list[str]) -> list[str]:
    return sorted(texts, key=lambda t: hashlib.sha256(t.encode()).hexdigest())


def first_bytes(texts: list[str], budget: int) -> list[str]:
    """The oracle of the BPE's training text: `budget` bytes from the start, one text per document."""
    out = []
    for text in texts:
        data = text.encode()[:budget]
        if not data:
            break
        out.append(data.decode(errors="ignore"))
        budget -= len(data)
    return out


def spec(folder: Path, **fields) -> DataSpec:
    return DataSpec(**({"train": str(folder), "unique_tokens": 2000, "validation_tokens": 600, "seq_len": 16,
                        "tokenizer": {"kind": "bpe", "vocab_size": 320, "training_bytes": 4096}} | fields))


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, list[str]]:
    return tmp_path / "corpus", write_corpus(tmp_path / "corpus", 90)  # about 20 KB


def test_sweep_points_of_one_experiment_share_one_tokenizer(tmp_path, corpus):
    folder, texts = corpus
    small = prepare_data(spec(folder, unique_tokens=1000, epochs=8), 0, tmp_path / "cache")
    large = prepare_data(spec(folder, unique_tokens=4000, epochs=2), 0, tmp_path / "cache")
    # two pools, one cache entry (the larger pool is the smaller one continued) and one tokenizer
    assert small.metadata["cache_key"] == large.metadata["cache_key"] and large.metadata["cache_hit"]
    assert large.pool[:1000].tolist() == small.pool.tolist()
    assert small.tokenizer.to_json() == large.tokenizer.to_json()
    assert small.tokenizer.fingerprint == large.tokenizer.fingerprint
    # it is the BPE of the source's first 4096 bytes in hash order, the last document cut
    oracle = Tokenizer.train_bpe(first_bytes(in_hash_order(texts), 4096), 320)
    assert small.tokenizer.to_json() == oracle.to_json()
    assert small.metadata["tokenizer_training_bytes"] == 4096


def test_another_training_budget_is_another_tokenizer_and_another_cache_entry(tmp_path, corpus):
    folder, texts = corpus
    first = prepare_data(spec(folder), 0, tmp_path / "cache")
    other = prepare_data(spec(folder, tokenizer={"kind": "bpe", "vocab_size": 320, "training_bytes": 8192}), 0,
                         tmp_path / "cache")
    assert other.metadata["cache_hit"] is False and other.metadata["cache_key"] != first.metadata["cache_key"]
    assert other.tokenizer.fingerprint != first.tokenizer.fingerprint
    assert other.tokenizer.to_json() == Tokenizer.train_bpe(first_bytes(in_hash_order(texts), 8192), 320).to_json()


def test_the_tokenizer_never_reads_held_out_validation_text(tmp_path):
    folder = tmp_path / "small"
    texts = write_corpus(folder, 40)  # about 9 KB: the budget would reach the held-out documents
    prepared = prepare_data(spec(folder, unique_tokens=800, validation_tokens=1000,
                                 tokenizer={"kind": "bpe", "vocab_size": 320, "training_bytes": 1 << 20}),
                            0, tmp_path / "cache")
    held_out = prepared.metadata["validation_documents"]
    ordered = in_hash_order(texts)
    validation_text = prepared.tokenizer.decode(prepared.val, skip_special_tokens=True)
    assert held_out > 1 and all(t in validation_text for t in ordered[len(ordered) - held_out + 1:])  # from the end
    oracle = Tokenizer.train_bpe(ordered[: len(ordered) - held_out], 320)  # everything else, nothing of those
    assert prepared.tokenizer.to_json() == oracle.to_json()
    assert prepared.metadata["tokenizer_training_documents"] == len(ordered) - held_out


def test_a_validation_source_of_its_own_is_not_in_the_tokenizers_text(tmp_path, corpus):
    folder, texts = corpus
    validation = tmp_path / "validation"
    validation.mkdir()
    first = in_hash_order(texts)[0]  # also in the training source, where the BPE would read it first
    (validation / "a.txt").write_text(first)
    (validation / "b.txt").write_text("a held-out validation text about other things " * 40)
    prepared = prepare_data(spec(folder, validation=str(validation)), 0, tmp_path / "cache")
    oracle = Tokenizer.train_bpe(first_bytes(in_hash_order(texts)[1:], 4096), 320)
    assert prepared.tokenizer.to_json() == oracle.to_json()
