"""The data pipeline: corpora, tokenizers, the unique pool, validation, the token cache, epochs and ranks."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from trainer_runs import step_tokens

from dlmctl.spec.sections import DataSpec
from dlmctl.trainer.corpus import Document, documents_from_file, open_source
from dlmctl.trainer.data import DataError, prepare_data, unigram_entropy
from dlmctl.trainer.data_plan import hash_order
from dlmctl.trainer.eval_data import choice_examples, val_batches
from dlmctl.trainer.sampler import EpochSampler, TrainBatches, sample_indices
from dlmctl.trainer.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def write_corpus(folder: Path, n: int = 40) -> list[str]:
    """n small distinct text files; returns their texts."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(30 + i % 17)]
        text = f"document {i:03d}: " + " ".join(words) + ".\n"
        (folder / f"doc{i:03d}.txt").write_text(text)
        texts.append(text)
    return texts


def data_spec(source: Path | str, **fields) -> DataSpec:
    defaults = dict(train=str(source), unique_tokens=2000, validation_tokens=1500, seq_len=16,
                    tokenizer={"kind": "byte"})
    return DataSpec(**(defaults | fields))


def segments(tokens: np.ndarray, tokenizer: Tokenizer) -> list[str]:
    """Split a token stream at eos and decode each piece."""
    pieces, current = [], []
    for t in tokens.tolist():
        if t == tokenizer.eos_id:
            pieces.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    return pieces + ([tokenizer.decode(current)] if current else [])


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, list[str]]:
    return tmp_path / "corpus", write_corpus(tmp_path / "corpus")


# --- corpora -------------------------------------------------------------------------------------


def test_python_stdlib_corpus_is_non_trivial_human_written_and_deterministic():
    first, second = open_source("builtin:python-stdlib").documents(), open_source("builtin:python-stdlib").documents()
    assert [(d.name, d.digest) for d in first] == [(d.name, d.digest) for d in second]
    names = {d.name for d in first}
    assert len(first) > 300 and sum(len(d.text) for d in first) > 3_000_000
    assert {"json/decoder.py", "argparse.py", "collections/__init__.py"} <= names
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(Path(n).parts) for n in names)
    assert "encodings/cp1252.py" not in names  # a generated codec table, not library code
    assert all(d.text.strip() for d in first) and len({d.digest for d in first}) == len(first)


def test_files_become_documents_by_kind(tmp_path):
    assert [d.text for d in documents_from_file("notes.md", b"# Title\n\nbody\n")] == ["# Title\n\nbody\n"]
    jsonl = b'{"text": "first"}\n\n{"other": 1}\n{"text": "second"}\n'
    assert [d.text for d in documents_from_file("data.jsonl", jsonl)] == ["first", "second"]
    paragraphs = "\n\n".join(f"paragraph {i} " + "word " * 40 for i in range(400)).encode()
    runs = documents_from_file("big.txt", paragraphs)  # a large .txt is a corpus: runs of whole paragraphs
    assert 10 < len(runs) < 100 and all(r.text.startswith("paragraph ") for r in runs)
    assert "\n\n".join(r.text for r in runs) == paragraphs.decode().strip("\n")
    (tmp_path / "a.txt").write_text("same text")
    (tmp_path / "b.txt").write_text("same text")
    (tmp_path / "c.txt").write_text("   \n")
    assert [d.name for d in open_source(str(tmp_path)).documents()] == ["a.txt"]  # duplicates and blanks go


@pytest.mark.skipif(not SHARED.exists(), reason="shared test corpora not present")
def test_wikitext_is_split_into_articles_and_shakespeare_into_paragraph_runs():
    articles = open_source(str(SHARED / "wikitext-2" / "valid.txt")).documents()
    assert len(articles) > 50 and all(d.text.lstrip().startswith("= ") for d in articles)
    plays = open_source(str(SHARED / "tinyshakespeare" / "input.txt")).documents()
    assert len(plays) > 200 and plays[0].text.startswith("First Citizen:")


# --- tokenizers ----------------------------------------------------------------------------------

TRICKY = "déjà vu 🎉\r\n\tdef f(x):\n    return x  # [MASK] <|endoftext|> \x00 end"


def test_byte_tokenizer_is_utf8_bytes_plus_eos_and_mask():
    tokenizer = Tokenizer.byte()
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.mask_id) == (258, 256, 257)
    assert tokenizer.encode(TRICKY) == list(TRICKY.encode())
    assert tokenizer.decode(tokenizer.encode(TRICKY)) == TRICKY


def _stdlib_sample(max_bytes: int = 300_000) -> list[str]:
    docs, size = [], 0
    for doc in hash_order(open_source("builtin:python-stdlib").documents()):
        docs.append(doc.text)
        size += len(doc.text)
        if size > max_bytes:
            return docs
    return docs


def test_bpe_is_trained_deterministically_even_across_processes_and_round_trips():
    texts = _stdlib_sample()
    first, second = Tokenizer.train_bpe(texts, 600), Tokenizer.train_bpe(texts, 600)
    assert first.to_json() == second.to_json() and first.vocab_size == 600
    assert first.encode(texts[0]) == second.encode(texts[0])
    assert len(first.encode(texts[0])) < len(texts[0].encode()) / 2  # it learnt something
    other = subprocess.run(
        [sys.executable, "-c", "import sys, hashlib; from dlmctl.trainer.tokenizer import Tokenizer; "
         "texts = sys.stdin.read().split('\\0'); print(Tokenizer.train_bpe(texts, 600).fingerprint)"],
        input="\0".join(texts), capture_output=True, text=True, check=True, env=os.environ | {"PYTHONHASHSEED": "7"},
    )
    assert other.stdout.strip() == first.fingerprint
    for text in (TRICKY, texts[1]):
        assert first.decode(first.encode(text)) == text


def test_mask_and_eos_are_never_produced_by_encoding_text(tmp_path):
    bpe = Tokenizer.train_bpe(["[MASK] <|endoftext|> " * 50, TRICKY], 300)
    loaded = Tokenizer.load(bpe.save(tmp_path / "tok"))
    for tokenizer in (Tokenizer.byte(), bpe, loaded):
        ids = tokenizer.encode("[MASK]<|endoftext|> " + TRICKY)
        assert tokenizer.mask_id not in ids and tokenizer.eos_id not in ids
        assert max(ids) < tokenizer.vocab_size and tokenizer.mask_id < tokenizer.vocab_size


def test_tokenizer_json_saves_and_loads_with_the_same_ids(tmp_path, corpus):
    bpe = Tokenizer.train_bpe(_stdlib_sample(100_000), 400)
    path = bpe.save(tmp_path / "export")
    assert path.name == "tokenizer.json"
    loaded = Tokenizer.load(path)
    assert (loaded.eos_id, loaded.mask_id, loaded.vocab_size) == (bpe.eos_id, bpe.mask_id, bpe.vocab_size)
    assert loaded.encode(TRICKY) == bpe.encode(TRICKY)
    folder, _ = corpus
    prepared = prepare_data(data_spec(folder, tokenizer={"kind": "file", "path": str(path)}), 0, tmp_path / "cache")
    assert prepared.tokenizer.to_json() == bpe.to_json()


def test_a_foreign_tokenizer_json_gets_eos_and_mask_added(tmp_path):
    foreign = Tokenizer.byte().hf
    foreign_json = foreign.to_str().replace("<|endoftext|>", "<s>").replace("[MASK]", "<pad>")
    (tmp_path / "tokenizer.json").write_text(foreign_json)
    tokenizer = Tokenizer.load(tmp_path)
    assert (tokenizer.eos_id, tokenizer.mask_id, tokenizer.vocab_size) == (258, 259, 260)
    assert tokenizer.decode([tokenizer.mask_id]) == "[MASK]"


# --- the unique pool and validation --------------------------------------------------------------


def test_unique_tokens_are_whole_documents_in_hash_order_cut_into_sequences(tmp_path, corpus):
    folder, texts = corpus
    prepared = prepare_data(data_spec(folder, unique_tokens=2000, seq_len=48), 0, tmp_path / "cache")
    training = [d for d in hash_order([Document("", t) for t in texts])]
    stream = [b for doc in training for b in list(doc.text.encode()) + [256]]
    n = 2000 // 48
    assert prepared.train.shape == (n, 48)
    assert prepared.train.ravel().tolist() == stream[: n * 48]
    assert prepared.metadata["unique_tokens"] == n * 48 and prepared.metadata["unique_sequences"] == n
    assert prepared.train.dtype == np.uint16


def test_validation_never_shares_a_document_with_training(tmp_path, corpus):
    folder, texts = corpus
    for tokenizer in ({"kind": "byte"}, {"kind": "bpe", "vocab_size": 300}):
        prepared = prepare_data(data_spec(folder, tokenizer=tokenizer), 0, tmp_path / "cache")
        tok = prepared.tokenizer

        def documents_in(tokens):
            return {next(i for i, t in enumerate(texts) if t.startswith(piece)) for piece in segments(tokens, tok) if len(piece) > 14}

        train_docs, val_docs = documents_in(prepared.train.ravel()), documents_in(prepared.val)
        assert len(prepared.val) == 1500 and train_docs and val_docs and not train_docs & val_docs
        meta = prepared.metadata
        # the BPE reads from the start of the hash order, validation from its end: they never meet
        assert meta["tokenizer_training_documents"] + meta["validation_documents"] <= meta["source_documents"]


def test_a_validation_source_of_its_own_takes_priority_over_shared_documents(tmp_path, corpus):
    folder, texts = corpus
    (tmp_path / "val").mkdir()
    shutil.copy(folder / "doc005.txt", tmp_path / "val" / "shared.txt")
    (tmp_path / "val" / "extra.txt").write_text("a held-out validation text " * 80)
    spec = data_spec(folder, validation=str(tmp_path / "val"), unique_tokens=4000, validation_tokens=1000)
    prepared = prepare_data(spec, 0, tmp_path / "cache")
    assert texts[5] not in "".join(segments(prepared.train.ravel(), prepared.tokenizer))
    assert "held-out validation" in prepared.tokenizer.decode(prepared.val)


def test_asking_for_more_unique_tokens_than_the_source_has_is_one_clear_error(tmp_path, corpus):
    folder, _ = corpus
    with pytest.raises(DataError) as err:
        prepare_data(data_spec(folder, unique_tokens=9000), 0, tmp_path / "tokenized")
    message = str(err.value)
    assert message.startswith("spec.data.unique_tokens: 9,000 tokens asked") and "\n" not in message
    # to know, the whole source was tokenized: that entry is complete, and another budget reuses it
    assert prepare_data(data_spec(folder, unique_tokens=900), 0, tmp_path / "tokenized").metadata["cache_hit"]
    with pytest.raises(DataError, match=r"^spec.data.validation_tokens: 50,000"):
        prepare_data(data_spec(folder, validation_tokens=50_000), 0, tmp_path / "cache")
    with pytest.raises(DataError, match=r"^spec.data.train: .* does not exist"):
        prepare_data(data_spec(tmp_path / "missing"), 0, tmp_path / "cache")
    (tmp_path / "not-a-tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match=r"^spec.data.tokenizer.path: .* is not a tokenizer.json"):
        prepare_data(data_spec(folder, tokenizer={"kind": "file", "path": str(tmp_path / "not-a-tokenizer.json")}), 0, tmp_path / "cache")
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match=r"^spec.data.train: broken.jsonl: line 2 is not valid JSON$"):
        prepare_data(data_spec(folder), 0, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/manifest.json"))  # nothing written


def test_metadata_reports_the_unigram_entropy_of_the_training_tokens(tmp_path, corpus):
    folder, _ = corpus
    prepared = prepare_data(data_spec(folder), 0, tmp_path / "cache")
    counts = np.array(list(Counter(prepared.train.ravel().tolist()).values()), dtype=float)
    p = counts / counts.sum()
    assert prepared.metadata["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum())
    assert 0 < unigram_entropy(prepared.train) < np.log(prepared.tokenizer.vocab_size)


def test_python_stdlib_with_bpe_end_to_end(tmp_path):
    spec = DataSpec(unique_tokens=30_000, validation_tokens=4096, seq_len=64, tokenizer={"vocab_size": 512})
    prepared = prepare_data(spec, 1, tmp_path / "cache")
    meta = prepared.metadata
    assert prepared.train.shape == (468, 64) and len(prepared.val) == 4096
    assert meta["vocab_size"] == 512 and prepared.train.max() < 512 and meta["source"] == "builtin:python-stdlib"
    assert 3.0 < meta["unigram_entropy"] < np.log(512)
    text = prepared.tokenizer.decode(prepared.train.ravel())
    assert "def " in text and "import " in text


# --- bytes per validation token (for bits per byte) ----------------------------------------------


def test_with_the_byte_tokenizer_every_validation_token_but_eos_is_one_byte_of_ascii_text(tmp_path, corpus):
    folder, _ = corpus
    prepared = prepare_data(data_spec(folder), 0, tmp_path / "cache")
    val, eos = prepared.val, prepared.tokenizer.eos_id
    assert 0 < (val == eos).sum() and val[-1] != eos  # whole documents, and a last one cut
    meta = prepared.metadata
    assert meta["validation_bytes"] == len(val) - (val == eos).sum()
    assert meta["validation_bytes_per_token"] == (len(val) - (val == eos).sum()) / len(val)


def test_with_bpe_the_ratio_is_the_texts_bytes_over_its_tokens(tmp_path, corpus):
    folder, _ = corpus
    (tmp_path / "val").mkdir()
    text = "A held-out validation text, in plain ASCII: def f(x): return x * 2  # twice\n" * 12
    (tmp_path / "val" / "v.txt").write_text(text)
    spec = data_spec(folder, validation=str(tmp_path / "val"), validation_tokens=64,
                     tokenizer={"kind": "bpe", "vocab_size": 300})
    ids = prepare_data(spec, 0, tmp_path / "cache").tokenizer.encode(text)  # the tokenizer ignores validation
    whole = prepare_data(spec.model_copy(update={"validation_tokens": len(ids)}), 0, tmp_path / "cache")
    assert whole.val.tolist() == ids  # the whole text, its end-of-document cut off
    assert whole.metadata["validation_bytes_per_token"] == len(text.encode()) / len(ids)
    with_eos = prepare_data(spec.model_copy(update={"validation_tokens": len(ids) + 1}), 0, tmp_path / "cache")
    assert with_eos.metadata["validation_bytes_per_token"] == len(text.encode()) / (len(ids) + 1)  # EOS: 0 bytes
    cut = prepare_data(spec.model_copy(update={"validation_tokens": 50}), 0, tmp_path / "cache")
    assert cut.metadata["validation_bytes"] == len(cut.tokenizer.decode(ids[:50]).encode())


def test_a_character_split_by_the_cut_counts_whole(tmp_path, corpus):
    folder, _ = corpus
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v.txt").write_text("é" * 20)  # 2 bytes, 2 byte tokens each
    spec = data_spec(folder, validation=str(tmp_path / "val"), validation_tokens=17)
    assert prepare_data(spec, 0, tmp_path / "cache").metadata["validation_bytes"] == 18  # 8½ characters -> 9


# --- the cache -----------------------------------------------------------------------------------


def test_a_second_run_loads_the_cache_without_tokenizing(tmp_path, corpus, monkeypatch):
    folder, _ = corpus
    spec = data_spec(folder, tokenizer={"kind": "bpe", "vocab_size": 300})
    first = prepare_data(spec, 0, tmp_path / "cache")
    assert first.metadata["cache_hit"] is False

    def forbidden(*args, **kwargs):
        raise AssertionError("tokenized on a cache hit")

    monkeypatch.setattr(Tokenizer, "encode_batch", forbidden)
    monkeypatch.setattr(Tokenizer, "train_bpe", forbidden)
    # another seed and sequence length share the entry: neither changes which tokens are chosen
    second = prepare_data(spec.model_copy(update={"seq_len": 8}), 99, tmp_path / "cache")
    assert second.metadata["cache_hit"] is True and second.metadata["cache_key"] == first.metadata["cache_key"]
    assert np.array_equal(second.train.ravel()[: first.train.size], first.train.ravel())
    assert second.tokenizer.to_json() == first.tokenizer.to_json()
    (folder / "doc000.txt").write_text("changed content")  # new content, new key
    monkeypatch.undo()
    third = prepare_data(spec, 0, tmp_path / "cache")
    assert third.metadata["cache_hit"] is False and third.metadata["cache_key"] != first.metadata["cache_key"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


def test_concurrent_preparations_build_once_and_agree(tmp_path, corpus):
    folder, _ = corpus
    spec, results = data_spec(folder, tokenizer={"kind": "bpe", "vocab_size": 300}), []
    threads = [threading.Thread(target=lambda: results.append(prepare_data(spec, 0, tmp_path / "cache"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.metadata["cache_hit"] for r in results) == [False, True, True]
    assert all(np.array_equal(r.train, results[0].train) and np.array_equal(r.val, results[0].val) for r in results)


# --- epochs, steps and ranks ---------------------------------------------------------------------


def pool(n: int = 10, seq_len: int = 4) -> np.ndarray:
    return np.arange(n * seq_len, dtype=np.uint16).reshape(n, seq_len)



def test_k_epochs_see_exactly_k_copies_of_the_unique_pool():
    sequences, batches = pool(10), TrainBatches(pool(10), seed=3)
    seen = np.concatenate([step_tokens(batches, s, world=2, micro_batch=1, global_batch=4) for s in range(10)])
    assert len(seen) == 40  # 4 epochs; steps 2 and 7 straddle an epoch boundary
    assert Counter(seen.ravel().tolist()) == Counter((sequences.ravel().tolist()) * 4)
    for epoch in range(4):  # and every single epoch is one full pass
        assert sorted(map(tuple, seen[epoch * 10:(epoch + 1) * 10])) == sorted(map(tuple, sequences))


def test_each_epoch_has_a_fresh_but_reproducible_permutation():
    sampler = EpochSampler(1000, seed=5)
    orders = [sampler.permutation(e).copy() for e in range(3)]
    assert all(sorted(o) == list(range(1000)) for o in orders)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    again = EpochSampler(1000, seed=5)
    assert all(np.array_equal(again.permutation(e), orders[e]) for e in (2, 0, 1))
    assert not np.array_equal(EpochSampler(1000, seed=6).permutation(0), orders[0])


@pytest.mark.parametrize("world,micro_batch,global_batch", [(1, 8, 8), (2, 2, 8), (4, 1, 8), (2, 1, 8), (3, 2, 12)])
def test_ranks_and_micro_steps_take_disjoint_slices_whose_union_is_the_step(world, micro_batch, global_batch):
    for step in (0, 5):
        taken = [sample_indices(step, a, r, world, micro_batch, global_batch)
                 for a in range(global_batch // (micro_batch * world)) for r in range(world)]
        flat = np.concatenate(taken)
        assert len(set(flat.tolist())) == len(flat) == global_batch
        assert sorted(flat.tolist()) == list(range(step * global_batch, (step + 1) * global_batch))
    with pytest.raises(ValueError):
        sample_indices(0, 0, world, world, micro_batch, global_batch)  # no such rank
    with pytest.raises(ValueError):
        sample_indices(0, 0, 0, 2, 3, 8)  # 8 sequences do not split into micro-batches of 3 on 2 ranks


def test_a_step_holds_the_same_sequences_on_1_2_or_4_processes():
    batches = TrainBatches(pool(13), seed=11)
    for step in range(8):
        one = step_tokens(batches, step, world=1, micro_batch=8, global_batch=8)
        assert np.array_equal(one, step_tokens(batches, step, world=2, micro_batch=2, global_batch=8))
        assert np.array_equal(one, step_tokens(batches, step, world=4, micro_batch=1, global_batch=8))


def test_resuming_from_the_state_dict_continues_the_same_stream_on_any_world_size():
    uninterrupted = TrainBatches(pool(13), seed=2)
    expected = [step_tokens(uninterrupted, s, 1, 4, 4) for s in range(6)]
    before = TrainBatches(pool(13), seed=2)
    for s in range(3):
        before.step_done(s, 4)
    state = before.state_dict()
    after = TrainBatches(pool(13), seed=2)
    after.load_state_dict(state)
    start = after.resume_step(4)
    assert start == 3 and after.epoch_at() == pytest.approx(12 / 13)
    assert all(np.array_equal(step_tokens(after, s, 2, 2, 4), expected[s]) for s in range(start, 6))
    with pytest.raises(DataError, match=r"^spec.data: the checkpoint was trained on other data"):
        TrainBatches(pool(13) + 1, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match=r"^spec.seed"):
        TrainBatches(pool(13), seed=3).load_state_dict(state)


def test_epoch_is_a_real_number_of_passes():
    batches = TrainBatches(pool(10), seed=0)
    assert batches.epoch_at(15) == 1.5 and batches.epoch_at(0) == 0.0
    batches.step_done(step=2, global_batch=4)
    assert batches.epoch_at() == pytest.approx(1.2)


def test_the_batch_carries_global_sample_indices_and_long_tokens():
    tokens, samples = TrainBatches(pool(10), seed=0).batch(3, 1, 1, 2, 2, 8)
    assert samples.tolist() == [3 * 8 + (1 * 2 + 1) * 2, 3 * 8 + 7] and str(tokens.dtype) == "torch.int64"
    assert tokens.shape == (2, 4)


# --- validation and the continuation-choice task -------------------------------------------------


def test_validation_batches_are_fixed_rows_of_the_validation_stream():
    val = np.arange(100, dtype=np.uint16)
    batches = val_batches(val, batch_size=4, seq_len=8)
    assert [b.shape[0] for b in batches] == [4, 4, 4] and batches[0][1].tolist() == list(range(8, 16))
    assert all((a == b).all() for a, b in zip(batches, val_batches(val, 4, 8)))
    with pytest.raises(DataError, match="validation_tokens"):
        val_batches(val[:5], 4, 8)


def test_continuation_choice_puts_the_true_next_chunk_among_distinct_distractors():
    rng = np.random.default_rng(0)
    val = rng.integers(0, 500, size=5000).astype(np.uint16)
    examples = choice_examples(val, n=20, k=4, context_tokens=12, continuation_tokens=4, seed=1)
    assert examples == choice_examples(val, n=20, k=4, context_tokens=12, continuation_tokens=4, seed=1)
    assert examples != choice_examples(val, n=20, k=4, context_tokens=12, continuation_tokens=4, seed=2)
    stream = val.tolist()
    for context, candidates, answer in examples:
        start = next(i for i in range(0, len(stream), 16) if stream[i:i + 12] == context)
        assert candidates[answer] == stream[start + 12:start + 16]
        assert len(candidates) == 4 and len({tuple(c) for c in candidates}) == 4
    assert len({e.answer for e in examples}) > 1
    with pytest.raises(DataError, match="choice_task"):
        choice_examples(val[:100], n=20, k=4, context_tokens=12, continuation_tokens=4, seed=1)


# --- S3: the corpus and the cache on a real S3 server (SeaweedFS) --------------------------------


@pytest.mark.s3
def test_an_s3_corpus_and_an_s3_cache_shared_by_two_machines(s3_server, s3_uri, tmp_path, corpus, monkeypatch):
    folder, texts = corpus
    s3, prefix = s3_server.filesystem(), s3_uri.removeprefix("s3://")
    for path in sorted(folder.iterdir()):
        s3.pipe_file(f"{prefix}/corpus/{path.name}", path.read_bytes())
    spec = data_spec(f"{s3_uri}/corpus", cache=f"{s3_uri}/cache",
                     tokenizer={"kind": "bpe", "vocab_size": 300})
    local = prepare_data(data_spec(folder, tokenizer={"kind": "bpe", "vocab_size": 300}), 0, tmp_path / "local")
    first = prepare_data(spec, 0, tmp_path / "machine-a")
    assert first.metadata["cache_hit"] is False and np.array_equal(first.train, local.train)
    key = first.metadata["cache_key"]
    assert s3.exists(f"{prefix}/cache/{key}/manifest.json")

    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a, **k: pytest.fail("tokenized on an S3 cache hit"))
    second = prepare_data(spec, 0, tmp_path / "machine-b")  # a fresh local disk: the entry comes from S3
    assert second.metadata["cache_hit"] is True
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert hashlib.sha256(second.tokenizer.to_json().encode()).hexdigest() == first.tokenizer.fingerprint

    # an entry built before the S3 cache was configured is shared once it is
    shared = prepare_data(data_spec(folder, cache=f"{s3_uri}/cache", tokenizer={"kind": "bpe", "vocab_size": 300}),
                          0, tmp_path / "local")
    assert shared.metadata["cache_hit"] is True
    assert s3.exists(f"{prefix}/cache/{local.metadata['cache_key']}/manifest.json")
