"""Data at scale: the plan-and-shards pipeline chooses exactly what the in-memory algorithm chose, builds
shards lazily and shares one entry across unique-token budgets, and `prepare-data` splits the shards over
workers of an Indexed Job."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
from trainer_runs import tiny_run

from dlmctl.spec import Run
from dlmctl.spec.sections import DataSpec
from dlmctl.trainer.__main__ import main
from dlmctl.trainer.data import prepare_data
from dlmctl.trainer.sampler import RepackedBatches
from dlmctl.trainer.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


# --- the reference: the in-memory algorithm as it was before shards (DATA_FORMAT_VERSION 2) -------


def reference_documents(name: str, data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="replace")
    if name.endswith(".jsonl"):
        records = [json.loads(line) if line.strip() else None for line in text.splitlines()]
        return [r["text"] for r in records if isinstance(r, dict) and isinstance(r.get("text"), str)]
    if not (name.endswith(".txt") and len(data) > 64 * 1024):
        return [text]
    if re.search(r"^ = [^=].* = $", text, re.MULTILINE):
        starts = [m.start() for m in re.finditer(r"^ = [^=].* = $", text, re.MULTILINE)]
        starts = ([0] if starts[0] > 0 else []) + starts
        return [text[a:b].strip("\n") for a, b in zip(starts, starts[1:] + [len(text)])]
    runs, current, size = [], [], 0
    for paragraph in re.split(r"\n[ \t]*\n+", text):
        if paragraph.strip():
            current.append(paragraph.strip("\n"))
            size += len(paragraph)
            if size >= 4096:
                runs.append("\n\n".join(current))
                current, size = [], 0
    return runs + (["\n\n".join(current)] if current else [])


def in_hash_order(folder) -> list[str]:
    texts = [t for path in sorted(p for p in folder.rglob("*") if p.is_file())
             for t in reference_documents(path.name, path.read_bytes()) if t.strip()]
    return sorted(set(texts), key=lambda t: hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest())


def tokens_of(tokenizer: Tokenizer, texts: list[str], budget: int) -> tuple[list[int], int]:
    stream, used = [], 0
    for text in texts:
        if len(stream) >= budget:
            break
        stream += tokenizer.encode(text) + [tokenizer.eos_id]
        used += 1
    return stream[:budget], used


def first_bytes(texts: list[str], budget: int) -> list[str]:
    out = []
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")[:budget]
        if not data:
            break
        out.append(data.decode(errors="ignore"))
        budget -= len(data)
    return out


def reference(spec: DataSpec, folder, validation_folder=None) -> dict:
    """Pool, validation, tokenizer and document counts chosen with whole documents held in memory."""
    train = in_hash_order(folder)
    bpe = spec.tokenizer.kind == "bpe"

    def make(texts):
        return Tokenizer.train_bpe(first_bytes(texts, spec.tokenizer.training_bytes), spec.tokenizer.vocab_size) if bpe else Tokenizer.byte()

    if validation_folder is not None:
        val_docs = in_hash_order(validation_folder)
        train = [t for t in train if t not in set(val_docs)]
        tokenizer = make(train)
        val, val_used = tokens_of(tokenizer, val_docs, spec.validation_tokens)
        candidates = train
    else:
        excluded = 0
        while True:
            tokenizer = make(train[: len(train) - excluded])
            val, val_used = tokens_of(tokenizer, train[::-1], spec.validation_tokens)
            if len(first_bytes(train[: len(train) - excluded], spec.tokenizer.training_bytes) if bpe else []) <= len(train) - val_used:
                break
            excluded = val_used
        candidates = train[: len(train) - val_used]
    pool, pool_used = tokens_of(tokenizer, candidates, spec.unique_tokens)
    return {"pool": pool, "val": val, "tokenizer": tokenizer.to_json(), "pool_documents": pool_used,
            "validation_documents": val_used}


# --- a corpus with every kind of file ---------------------------------------------------------------


def text(i: int, words: int) -> str:
    return f"text {i}: " + " ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(words)) + " é€ 🎉."


def write_mixed_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        (folder / f"small{i:02d}.txt").write_text(text(i, 20 + i))
    (folder / "dup.md").write_text(text(3, 23))  # the same text as small03.txt: kept once
    (folder / "blank.py").write_text("   \n\t\n")
    (folder / "code.py").write_text("def f(x):\r\n    return x\r\n")
    records = [json.dumps({"text": text(100 + i, 15 + i % 9)}, ensure_ascii=i % 2 == 0) for i in range(60)]
    records[5], records[9] = "", json.dumps({"other": 1})
    records[7] += "\r"  # \r\n line ends
    records[11] += "\x0c" + json.dumps({"text": "two records on one line, split at a form feed"})
    (folder / "records.jsonl").write_text("\n".join(records) + "\n" + records[20])  # a duplicate, no final newline
    paragraphs = "\n\n".join(text(200 + i, 10 + i % 40) + ("\n \n\n" if i % 7 == 0 else "") for i in range(600))
    (folder / "book.txt").write_bytes(paragraphs.encode() + b"\n\n\xff\xfe broken bytes \xe2\x82\n\nlast paragraph")
    articles = "".join(f" = Article {i} = \n\n" + "\n".join(text(900 + i * 10 + k, 30) for k in range(6)) + "\n\n"
                       for i in range(90))
    (folder / "wiki.txt").write_text("preamble\n" + articles)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed") / "corpus"
    write_mixed_corpus(folder)
    return folder


SMALL_SHARDS = {"shard_bytes": 40_000}  # a few dozen documents per shard


def spec(folder, **fields) -> DataSpec:
    return DataSpec(**({"train": str(folder), "unique_tokens": 50_000, "validation_tokens": 3000, "seq_len": 64,
                        "tokenizer": {"kind": "byte"}, "preparation": SMALL_SHARDS} | fields))


CASES = {
    "byte": {},
    "bpe": {"tokenizer": {"kind": "bpe", "vocab_size": 300, "training_bytes": 30_000}},
    "bpe-reaching-validation": {"tokenizer": {"kind": "bpe", "vocab_size": 300, "training_bytes": 1 << 28},
                                "unique_tokens": 20_000, "validation_tokens": 60_000},
}


@pytest.mark.parametrize("case", CASES)
def test_the_sharded_pipeline_chooses_exactly_what_the_in_memory_algorithm_chose(tmp_path, mixed, case):
    data_spec = spec(mixed, **CASES[case])
    expected = reference(data_spec, mixed)
    prepared = prepare_data(data_spec, 0, tmp_path / "cache")
    assert int(prepared.metadata["shards"].split("/")[1]) >= 2
    assert np.asarray(prepared.pool).tolist() == expected["pool"]
    assert prepared.val.tolist() == expected["val"]
    assert prepared.tokenizer.to_json() == expected["tokenizer"]
    for field in ("pool_documents", "validation_documents"):
        assert prepared.metadata[field] == expected[field], field
    trained = np.array(expected["pool"][: prepared.train.size])
    p = np.unique(trained, return_counts=True)[1] / trained.size
    assert prepared.metadata["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)


def test_with_a_validation_source_too(tmp_path, mixed):
    validation = tmp_path / "validation"
    validation.mkdir()
    (validation / "shared.txt").write_text(text(5, 25))  # also a training document: validation only
    (validation / "more.jsonl").write_text("\n".join(json.dumps({"text": text(5000 + i, 40)}) for i in range(40)))
    data_spec = spec(mixed, validation=str(validation), tokenizer={"kind": "bpe", "vocab_size": 280, "training_bytes": 8000})
    expected = reference(data_spec, mixed, validation)
    prepared = prepare_data(data_spec, 0, tmp_path / "cache")
    assert np.asarray(prepared.pool).tolist() == expected["pool"] and prepared.val.tolist() == expected["val"]
    assert prepared.tokenizer.to_json() == expected["tokenizer"]


def test_shards_are_built_only_as_far_as_the_pool_reaches_and_every_budget_shares_them(tmp_path, mixed, monkeypatch):
    small = prepare_data(spec(mixed, unique_tokens=10_000), 0, tmp_path / "cache")
    used, total = map(int, small.metadata["shards"].split("/"))
    assert used < total and not (tmp_path / "cache" / small.metadata["cache_key"] / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "cache" / small.metadata["cache_key"] / "shards").glob("tokens-*")) == \
        [f"tokens-{j:05d}.npy" for j in range(used)]
    large = prepare_data(spec(mixed, unique_tokens=80_000), 0, tmp_path / "cache")
    assert large.metadata["cache_key"] == small.metadata["cache_key"] and not large.metadata["cache_hit"]
    assert np.array_equal(large.pool[:10_000], small.pool)
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a, **k: pytest.fail("tokenized again"))
    again = prepare_data(spec(mixed, unique_tokens=30_000, seq_len=32), 5, tmp_path / "cache")
    assert again.metadata["cache_hit"] and np.array_equal(again.pool, large.pool[:30_000])
    assert isinstance(again.pool, np.memmap)  # the pool is read from disk, not held


def test_per_epoch_packing_from_stored_document_offsets_equals_scanning_the_pool(tmp_path, mixed):
    prepared = prepare_data(spec(mixed, unique_tokens=41_234, packing="per-epoch"), 3, tmp_path / "cache")
    stored = prepared.train_batches()
    scanned = RepackedBatches(np.asarray(prepared.pool).copy(), prepared.tokenizer.eos_id, 64, seed=3)
    assert np.array_equal(stored.doc_starts, scanned.doc_starts) and stored.whole_documents == scanned.whole_documents
    samples = np.arange(0, 3 * stored.num_sequences, 7)
    assert np.array_equal(stored.rows(samples), scanned.rows(samples)) and stored.fingerprint == scanned.fingerprint


# --- prepare-data: the Indexed Job's command --------------------------------------------------------


def write_run(tmp_path, folder, **data) -> str:
    run = tiny_run(data={"train": str(folder), "unique_tokens": 50_000, "validation_tokens": 3000, "seq_len": 64,
                         "tokenizer": {"kind": "bpe", "vocab_size": 300}, "preparation": SMALL_SHARDS} | data)
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.json')))}.json"
    path.write_text(run.model_dump_json())
    return str(path)


def data_of(run: str) -> DataSpec:
    return Run.model_validate_json(open(run).read()).spec.data


def test_workers_split_the_shards_and_the_last_one_completes_the_entry(tmp_path, mixed, monkeypatch, capsys):
    monkeypatch.setenv("DLMCTL_CACHE", str(tmp_path / "cache"))
    run = write_run(tmp_path, mixed)
    codes = []
    waiting = threading.Thread(target=lambda: codes.append(main(["prepare-data", "--run", run, "--worker", "1", "--workers", "3"])))
    waiting.start()  # before the plan exists: it waits for worker 0's
    assert main(["prepare-data", "--run", run, "--worker", "0", "--workers", "3"]) == 0
    waiting.join()
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.setenv("DLMCTL_DATA_WORKERS", "3")
    assert main(["prepare-data", "--run", run]) == 0 and codes == [0]
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    shards = results[0]["shards"]
    assert [r["complete"] for r in results] == [False, False, True]
    assert sum(r["shards_built"] for r in results) == shards > 3 and [r["plan_built"] for r in results].count(True) == 1
    entry = tmp_path / "cache" / results[0]["cache_key"]
    completion = json.loads((entry / "manifest.json").read_text())
    assert completion["shards"] == shards and len(list(entry.glob("shards/shard-*.json"))) == shards
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a, **k: pytest.fail("tokenized after prepare-data"))
    prepared = prepare_data(data_of(run), 0, tmp_path / "cache")
    assert prepared.metadata["cache_hit"] and np.asarray(prepared.pool).tolist() == reference(data_of(run), mixed)["pool"]


def test_prepare_data_exit_codes(tmp_path, mixed):
    def run(*args, **data):
        return subprocess.run([sys.executable, "-m", "dlmctl.trainer", "prepare-data", "--run", write_run(tmp_path, mixed, **data),
                               *args], capture_output=True, text=True, env={**os.environ, "DLMCTL_CACHE": str(tmp_path / "cache")})

    too_much = run(validation_tokens=10_000_000)
    assert too_much.returncode == 2 and len(too_much.stderr.strip().splitlines()) == 1
    assert too_much.stderr.startswith("error: spec.data.validation_tokens: 10,000,000 tokens asked")
    bad_worker = run("--worker", "3", "--workers", "2")
    assert bad_worker.returncode == 2 and bad_worker.stderr.startswith("error: --worker: 3")
    done = run()
    assert done.returncode == 0 and json.loads(done.stdout)["complete"] is True


# --- S3: the job writes the cache, a training machine reads it ---------------------------------------


@pytest.mark.s3
def test_an_s3_cache_built_by_job_workers_is_read_by_range_and_never_whole(s3_server, s3_uri, tmp_path, mixed, monkeypatch):
    s3, prefix = s3_server.filesystem(), s3_uri.removeprefix("s3://")
    for path in sorted(mixed.iterdir()):
        s3.pipe_file(f"{prefix}/corpus/{path.name}", path.read_bytes())
    data = {"train": f"{s3_uri}/corpus", "cache": f"{s3_uri}/cache", "tokenizer": {"kind": "bpe", "vocab_size": 300}}
    run = write_run(tmp_path, mixed, **data)
    import s3fs

    whole_reads = []
    original = s3fs.S3FileSystem.cat_file

    def cat_file(self, path, start=None, end=None, **kwargs):
        if start is None and end is None and "/corpus/" in path and path.endswith(".jsonl"):
            whole_reads.append(path)
        return original(self, path, start=start, end=end, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "cat_file", cat_file)
    for worker in (0, 1):
        monkeypatch.setenv("DLMCTL_CACHE", str(tmp_path / f"pod-{worker}"))
        assert main(["prepare-data", "--run", run, "--worker", str(worker), "--workers", "2"]) == 0
    assert not whole_reads
    assert not list((tmp_path / "pod-1").rglob("tokens-*.npy"))  # a pod keeps nothing once uploaded
    local = prepare_data(data_of(write_run(tmp_path, mixed)), 0, tmp_path / "local")
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a, **k: pytest.fail("tokenized on an S3 cache hit"))
    remote = prepare_data(data_of(run), 0, tmp_path / "trainer")
    assert remote.metadata["cache_hit"] and np.array_equal(remote.pool, local.pool) and np.array_equal(remote.val, local.val)
    assert s3.exists(f"{prefix}/cache/{remote.metadata['cache_key']}/manifest.json")


def test_an_s3_cache_rides_out_a_flaky_store_like_the_checkpoint_store(s3_server, s3_uri, tmp_path, mixed, monkeypatch):
    """Every request of the token cache to S3 fails once (a connection reset: transient) and is retried."""
    from dlmctl.trainer import storage, token_cache
    from dlmctl.trainer.retries import RetryPolicy

    monkeypatch.setattr(token_cache, "REMOTE_RETRIES", RetryPolicy(first_delay=0.01, max_delay=0.02, give_up_after=30))
    failed = []
    for name in ("put_file", "get_file", "write_bytes", "read_bytes"):
        original = getattr(storage.Location, name)

        def flaky(self, *args, _original=original, _name=name, **kwargs):
            if (_name, str(args[0])) not in failed:
                failed.append((_name, str(args[0])))
                raise ConnectionResetError(104, "Connection reset by peer")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(storage.Location, name, flaky)
    run = write_run(tmp_path, mixed, cache=f"{s3_uri}/flaky-cache")
    monkeypatch.setenv("DLMCTL_CACHE", str(tmp_path / "pod"))
    assert main(["prepare-data", "--run", run]) == 0
    remote = prepare_data(data_of(run), 0, tmp_path / "trainer")
    local = prepare_data(data_of(write_run(tmp_path, mixed)), 0, tmp_path / "local")
    assert remote.metadata["cache_hit"] and np.array_equal(remote.pool, local.pool)
    assert {name for name, _ in failed} >= {"put_file", "get_file", "write_bytes", "read_bytes"}
