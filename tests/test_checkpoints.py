"""The checkpoint store: staged locally, streamed to S3 (a real SeaweedFS) or a local path, verified on resume.

Store semantics are the same on both backends, so most tests run on each. Faults are injected by
wrapping the store's Location (its one door to storage) or by killing the S3 server itself.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dlmctl.trainer.checkpoint_store import CheckpointStore
from dlmctl.trainer.retries import RetryPolicy
from dlmctl.trainer.store_errors import (
    CheckpointInvalid, CheckpointUploadError, NoVerifiedCheckpoint, RetryDeadlinePassed, StagingSpaceError,
    StoreUnavailable, is_transient,
)
from dlmctl.trainer.transfer import read_export, write_export
from dlmctl.trainer.storage import open_location
from s3_fixtures import fresh_prefix, use_s3_server
from testenv.cluster import free_ports

FAST_RETRY = RetryPolicy(first_delay=0.05, max_delay=0.5, give_up_after=60.0)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def uri(request, tmp_path):
    if request.param == "local":
        return f"file://{tmp_path}/checkpoints/run-a"
    return request.getfixturevalue("s3_uri") + "/run-a"


@pytest.fixture
def make_store(tmp_path):
    stores = []

    def make(uri, **options):
        options = {"staging_root": tmp_path / f"staging-{len(stores)}", "retry": FAST_RETRY,
                   "registry": CollectorRegistry(), "labels": LABELS, **options}
        store = CheckpointStore(uri, **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close(timeout=30)


def checkpoint_files(step: int) -> dict[str, bytes]:
    """What a trainer stages: a DeepSpeed folder, the sampler state and RNG states (small here)."""
    return {
        f"deepspeed/global_step{step}/mp_rank_00_model_states.pt": os.urandom(3000),
        f"deepspeed/global_step{step}/zero_pp_rank_0_mp_rank_00_optim_states.pt": os.urandom(5000),
        "sampler.json": json.dumps({"step": step, "position": step * 8}).encode(),
        "rng.pt": os.urandom(200),
    }


def save(store: CheckpointStore, step: int, epoch: float | None = None, files: dict | None = None):
    files = files or checkpoint_files(step)
    folder = store.staging_dir(step)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return store.commit(step, step / 10 if epoch is None else epoch), files


def saved(store, step, epoch=None):
    future, files = save(store, step, epoch)
    future.result(timeout=60)
    return files


def remote_bytes(store, *parts) -> bytes:
    return store.location.read_bytes(store.location.path(*parts))


LABELS = {"experiment": "exp", "run": "run-a", "arm": "diffusion", "point": "data.epochs=2"}


def sample(registry, name, **labels):
    return registry.get_sample_value(name, {**LABELS, **labels})


# --- saving ---------------------------------------------------------------------------------------

def test_commit_uploads_the_files_then_the_manifest_then_latest(uri, make_store, monkeypatch):
    registry = CollectorRegistry()
    store = make_store(uri, registry=registry)
    events = []
    put, write = store.location.put_file, store.location.write_bytes
    monkeypatch.setattr(store.location, "put_file",
                        lambda local, path: (put(local, path), events.append(("file", path.rsplit("/", 1)[-1]))))
    monkeypatch.setattr(store.location, "write_bytes",
                        lambda path, data: (write(path, data), events.append(("write", path.rsplit("/", 1)[-1]))))

    future, files = save(store, 10, epoch=0.5)
    info = future.result(timeout=60)

    assert [kind for kind, _ in events] == ["file"] * len(files) + ["write", "write"]
    assert [name for _, name in events[-2:]] == ["manifest.json", "latest"]
    manifest = json.loads(remote_bytes(store, "step-00000010", "manifest.json"))
    assert (manifest["step"], manifest["epoch"]) == (10, 0.5)
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        rel: (len(data), hashlib.sha256(data).hexdigest()) for rel, data in files.items()}
    assert remote_bytes(store, "latest") == b"step-00000010"
    assert info.step == 10 and info.total_bytes == sum(map(len, files.values()))
    assert not list(store.staging_root.iterdir()), "the staging copy is deleted once uploaded"
    assert sample(registry, "dlm_checkpoint_upload_bytes_total") == info.total_bytes
    assert sample(registry, "dlm_checkpoint_save_duration_seconds_count") == 1
    assert sample(registry, "dlm_checkpoint_last_success_timestamp_seconds") == pytest.approx(time.time(), abs=60)
    assert sample(registry, "dlm_checkpoint_stall_seconds_count") == 1


def test_a_saved_checkpoint_verifies_and_downloads_byte_for_byte(uri, make_store, tmp_path):
    store = make_store(uri)
    saved(store, 10)
    files = saved(store, 20)

    info = store.latest_verified()
    assert (info.step, info.epoch) == (20, 2.0)
    local = store.download(info, tmp_path / "resume")
    assert {rel: (local / rel).read_bytes() for rel in files} == files
    restored, folder = store.restore_latest(tmp_path / "resume-again")
    assert restored == info and (folder / "sampler.json").read_bytes() == files["sampler.json"]


def test_an_empty_uri_has_no_checkpoint(uri, make_store):
    store = make_store(uri)
    assert store.latest_verified() is None
    assert store.restore_latest("unused") is None


# --- resuming past damage ----------------------------------------------------------------------

def test_an_upload_that_never_finished_is_ignored_even_if_latest_points_at_it(uri, make_store, tmp_path):
    store = make_store(uri)
    good = saved(store, 10)
    loc = store.location
    for rel, data in checkpoint_files(20).items():  # what a killed uploader leaves: files, no manifest
        loc.write_bytes(loc.path("step-00000020", rel), data)
    loc.write_bytes(loc.path("latest"), b"step-00000020")  # and a pointer that ran ahead (the Composer bug)

    assert store.latest_verified().step == 10
    info, folder = store.restore_latest(tmp_path / "resume")
    assert info.step == 10 and (folder / "rng.pt").read_bytes() == good["rng.pt"]


def test_latest_pointing_at_a_missing_checkpoint_falls_back_to_the_newest_verified(uri, make_store):
    store = make_store(uri)
    saved(store, 10)
    saved(store, 20)
    store.location.write_bytes(store.location.path("latest"), b"step-00000030")
    assert store.latest_verified().step == 20
    store.location.remove_tree(store.location.path("step-00000020"))
    assert store.latest_verified().step == 10


def _tamper(loc, path):  # same size, different bytes
    data = bytearray(loc.read_bytes(path))
    data[len(data) // 2] ^= 0xFF
    loc.write_bytes(path, bytes(data))


def _truncate(loc, path):
    loc.write_bytes(path, loc.read_bytes(path)[:-100])


MODEL_FILE_20 = ("step-00000020", "deepspeed/global_step20/mp_rank_00_model_states.pt")
DAMAGE = {
    "tampered file": lambda loc: _tamper(loc, loc.path(*MODEL_FILE_20)),
    "truncated file": lambda loc: _truncate(loc, loc.path(*MODEL_FILE_20)),
    "missing file": lambda loc: loc.remove_file(loc.path("step-00000020", "rng.pt")),
    "garbled manifest": lambda loc: loc.write_bytes(loc.path("step-00000020", "manifest.json"), b'{"format": "dlm'),
    "manifest of another step": lambda loc: loc.write_bytes(
        loc.path("step-00000020", "manifest.json"), loc.read_bytes(loc.path("step-00000010", "manifest.json"))),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_for_the_previous_good_one(uri, make_store, tmp_path, caplog, damage):
    store = make_store(uri)
    good = saved(store, 10)
    saved(store, 20)
    DAMAGE[damage](store.location)

    with caplog.at_level(logging.WARNING, logger="dlmctl.checkpoints"):
        assert store.latest_verified().step == 10
        info, folder = store.restore_latest(tmp_path / "resume")
    assert info.step == 10 and (folder / "sampler.json").read_bytes() == good["sampler.json"]
    assert "step-00000020" in caplog.text
    assert not (tmp_path / "resume" / "step-00000020").exists()


def test_checkpoints_that_exist_but_none_verifies_are_an_error_naming_them_not_a_fresh_start(uri, make_store,
                                                                                              tmp_path):
    store = make_store(uri)
    saved(store, 10)
    saved(store, 20)
    loc = store.location
    _tamper(loc, loc.path("step-00000010", "rng.pt"))
    _truncate(loc, loc.path("step-00000020", "sampler.json"))
    for check in (lambda: store.restore_latest(tmp_path / "resume"), lambda: store.latest_verified()):
        with pytest.raises(NoVerifiedCheckpoint, match="2 checkpoints and none verifies") as error:
            check()
        assert "step-00000010: rng.pt" in str(error.value) and "step-00000020: sampler.json" in str(error.value)
        assert "--fresh" in str(error.value)

    only_unfinished = make_store(uri + "-unfinished")  # an upload killed before its manifest: not a checkpoint
    for rel, data in checkpoint_files(4).items():
        only_unfinished.location.write_bytes(only_unfinished.location.path("step-00000004", rel), data)
    assert only_unfinished.restore_latest(tmp_path / "resume") is None


def test_a_fresh_start_keeps_the_old_checkpoints_until_its_first_one_is_written(uri, make_store, monkeypatch,
                                                                                tmp_path):
    old = make_store(uri, keep_last=3)
    old_files = saved(old, 4)
    saved(old, 8)
    fresh = make_store(uri, keep_last=3)
    assert fresh.restore_latest(tmp_path / "r", fresh="1") is None and fresh.generation == 1
    gate, uploading = threading.Event(), threading.Event()
    put = fresh.location.put_file

    def gated_put(local, path):
        uploading.set()
        assert gate.wait(30)
        put(local, path)

    monkeypatch.setattr(fresh.location, "put_file", gated_put)
    first, _ = save(fresh, 4)  # the same step as an old checkpoint
    assert uploading.wait(30)
    loc = fresh.location
    assert fresh.verify(8).step == 8, "the old checkpoints are all there while the first new one uploads"
    aside = loc.list_files(loc.path("superseded"))
    assert {rel: loc.read_bytes(loc.path("superseded", rel)) for rel in aside if "manifest" not in rel} == {
        f"step-00000004.g0/{rel}": data for rel, data in old_files.items()}
    gate.set()
    assert first.result(timeout=60).step == 4

    assert fresh.list_steps() == [4], "retention removes the earlier start's checkpoints once the new one exists"
    assert not loc.list_files(loc.path("superseded"))
    assert json.loads(remote_bytes(fresh, "step-00000004", "manifest.json"))["generation"] == 1
    saved(old, 12)  # a writer of the earlier start that lagged behind: never resumed again
    again = make_store(uri)
    info, _ = again.restore_latest(tmp_path / "again", fresh="1")
    assert info.step == 4 and again.generation == 1, "a restart of the same fresh start resumes it"
    assert make_store(uri).restore_latest(tmp_path / "plain")[0].step == 4, "only the newest start counts"
    another = make_store(uri)
    assert another.restore_latest(tmp_path / "another", fresh="2") is None and another.generation == 2


def test_size_only_verification_is_fast_but_misses_same_size_tampering(uri, make_store):
    store = make_store(uri)
    saved(store, 10)
    saved(store, 20)
    DAMAGE["tampered file"](store.location)
    assert store.latest_verified(full=False).step == 20
    assert store.latest_verified(full=True).step == 10
    with pytest.raises(CheckpointInvalid, match="sha256"):
        store.verify(20)


def test_an_unreachable_store_is_an_error_on_resume_not_an_empty_run(make_store, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    store = make_store("s3://bucket/run-a", endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}",
                       retry=RetryPolicy(first_delay=0.01, max_delay=0.05, give_up_after=0.2))
    with pytest.raises(StoreUnavailable, match="127.0.0.1"):
        store.latest_verified()
    with pytest.raises(StoreUnavailable):
        store.restore_latest("unused")


# --- failures never reach training ---------------------------------------------------------------

def test_outages_are_retried_and_mistakes_are_not():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    transient = [EndpointConnectionError(endpoint_url="http://s3"), ReadTimeoutError(endpoint_url="http://s3"),
                 ConnectionResetError(), ConnectionRefusedError(), TimeoutError(), OSError(errno.EIO, "503 SlowDown"),
                 OSError(errno.EBUSY, "SlowDown"), OSError(errno.EREMOTEIO, "InternalError")]
    permanent = [PermissionError("AccessDenied"), FileNotFoundError("NoSuchBucket"), NoCredentialsError(),
                 ValueError("bad path"), OSError(errno.ENOSPC, "No space left on device"),
                 OSError(errno.EDQUOT, "Disk quota exceeded"), OSError(errno.EROFS, "Read-only file system"),
                 OSError(errno.EMSGSIZE, "EntityTooLarge")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_a_failed_checkpoint_is_counted_and_the_next_one_still_saves(uri, make_store, monkeypatch, caplog):
    registry = CollectorRegistry()
    store = make_store(uri, registry=registry, retry=RetryPolicy(first_delay=0.01, max_delay=0.05, give_up_after=0.3))
    put = store.location.put_file

    def flaky_put(local, path):
        if "step-00000010" in path:
            raise PermissionError("AccessDenied")  # permanent: no retry
        if "step-00000020" in path:
            raise ConnectionRefusedError("store unreachable")  # transient, past the retry budget
        put(local, path)

    monkeypatch.setattr(store.location, "put_file", flaky_put)
    with caplog.at_level(logging.ERROR, logger="dlmctl.checkpoints"):
        first, _ = save(store, 10)
        second, _ = save(store, 20)
        third, _ = save(store, 30)
        assert store.flush(timeout=60)
    with pytest.raises(PermissionError):
        first.result()
    with pytest.raises(CheckpointUploadError, match="gave up"):
        second.result()
    assert third.result().step == 30
    assert store.latest_verified().step == 30
    assert store.stats["failed"] == 2 and store.stats["saved"] == 1
    assert sample(registry, "dlm_checkpoint_upload_failures_total") == 2
    assert sample(registry, "dlm_checkpoint_upload_retries_total") >= 1
    assert "step 10 NOT saved" in caplog.text and "step 20 NOT saved" in caplog.text
    assert not list(store.staging_root.glob("step-*")), "failed checkpoints do not keep the staging disk full"
    assert store.failure.exit_code == 2, "a permanent error is the run's end, with its reason"
    assert "checkpoint step 10 not saved" in str(store.failure) and "AccessDenied" in str(store.failure)


def test_an_unreachable_store_says_since_when_and_fails_once_past_the_deadline(make_store, monkeypatch, caplog):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    registry = CollectorRegistry()
    store = make_store("s3://bucket/run-a", endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}", registry=registry,
                       retry=RetryPolicy(first_delay=0.05, max_delay=0.2, give_up_after=2.0))
    began = time.time()
    with caplog.at_level(logging.WARNING, logger="dlmctl.checkpoints"):
        future, _ = save(store, 10)
        deadline = time.monotonic() + 30
        while store.unreachable_since is None and not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        since = store.unreachable_since
        assert since is not None and began - 1 <= since <= time.time()
        assert store.stats["unreachable_since"] == since and not future.done()
        assert sample(registry, "dlm_checkpoint_store_unreachable_since_timestamp_seconds") == since
        with pytest.raises(RetryDeadlinePassed):
            future.result(timeout=60)
    assert "unreachable since" in caplog.text and "retrying with backoff until" in caplog.text
    assert store.failure.exit_code == 1, "an outage is not the user's error"
    assert "unreachable since" in str(store.failure) and "the retry deadline is 2s" in str(store.failure)


def test_a_staging_disk_too_small_for_one_checkpoint_is_an_error_with_the_sizes(tmp_path, make_store, monkeypatch):
    store, gate = _gated_store(make_store, tmp_path / "ckpt", monkeypatch)
    first, _ = save(store, 1)
    free = shutil.disk_usage(store.staging_root).free
    assert store.staging_dir(2, need_bytes=1000).is_dir(), "a checkpoint that fits is staged at once"
    threading.Timer(0.3, gate.set).start()
    with pytest.raises(StagingSpaceError) as error:
        store.staging_dir(3, need_bytes=free * 2)  # waits for the pending upload first: it might free the room
    assert first.done(), "it failed only once no upload was pending"
    assert error.value.need == free * 2 and error.value.free > 0
    assert str(store.staging_root) in str(error.value) and "is free there" in str(error.value)
    assert not list(store.staging_root.glob("step-00000003*")), "nothing staged for it"


@pytest.mark.s3
def test_uploads_survive_the_s3_server_going_down_mid_checkpoint(s3_outage_server, make_store, monkeypatch, request):
    server = s3_outage_server
    use_s3_server(server, monkeypatch)
    registry = CollectorRegistry()
    store = make_store(fresh_prefix(server, request), registry=registry,
                       retry=RetryPolicy(first_delay=0.1, max_delay=0.5, give_up_after=120), max_concurrency=1)
    saved(store, 10)
    outage = threading.Event()
    put = store.location.put_file

    def put_then_crash_the_server(local, path):
        put(local, path)
        if "step-00000020" in path and not outage.is_set():
            server.stop(grace=0)  # kill -9 after the first file of the checkpoint is in
            outage.set()

    monkeypatch.setattr(store.location, "put_file", put_then_crash_the_server)
    second, _ = save(store, 20)
    assert outage.wait(30)
    third, _ = save(store, 30)  # training goes on while the store is down
    deadline = time.monotonic() + 30
    while store.stats["retries"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.stats["retries"] >= 2 and not second.done()

    server.start()
    assert store.flush(timeout=120)
    assert (second.result().step, third.result().step) == (20, 30)
    assert store.stats["failed"] == 0 and sample(registry, "dlm_checkpoint_upload_failures_total") == 0
    assert sample(registry, "dlm_checkpoint_upload_retries_total") >= 2
    assert store.latest_verified().step == 30
    assert store.verify(20).step == 20


# --- bounded staging -----------------------------------------------------------------------------

def _gated_store(make_store, uri, monkeypatch, **options):
    store = make_store(uri, **options)
    gate = threading.Event()
    put = store.location.put_file

    def slow_put(local, path):
        assert gate.wait(30)
        put(local, path)

    monkeypatch.setattr(store.location, "put_file", slow_put)
    return store, gate


def _in_thread(fn):
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_a_full_staging_disk_makes_the_next_save_wait_and_the_stall_is_measured(tmp_path, make_store, monkeypatch):
    registry = CollectorRegistry()
    store, gate = _gated_store(make_store, tmp_path / "ckpt", monkeypatch, max_staging_bytes=12_000, registry=registry)
    first, files = save(store, 1)  # ~8 KB: a second one would not fit
    assert not first.done() and store.stats["pending_bytes"] == sum(map(len, files.values()))

    waiting = _in_thread(lambda: store.staging_dir(2))
    waiting.join(0.5)
    assert waiting.is_alive(), "staging_dir() waits for the upload before the trainer writes more"
    gate.set()
    waiting.join(30)
    assert not waiting.is_alive()
    second, _ = save(store, 2)
    second.result(timeout=30)
    assert store.stats["last_stall_seconds"] >= 0.5
    assert sample(registry, "dlm_checkpoint_stall_seconds_sum") >= 0.5
    assert sample(registry, "dlm_checkpoint_stall_seconds_count") == 2


def test_commit_blocks_when_a_checkpoint_overfills_the_staging_disk(tmp_path, make_store, monkeypatch):
    store, gate = _gated_store(make_store, tmp_path / "ckpt", monkeypatch, max_staging_bytes=12_000)
    save(store, 1)
    bigger = tmp_path / "written-elsewhere"  # the trainer wrote a bigger checkpoint without staging_dir()
    for rel, data in checkpoint_files(2).items():
        (bigger / rel).parent.mkdir(parents=True, exist_ok=True)
        (bigger / rel).write_bytes(data * 2)

    committing = _in_thread(lambda: store.commit(2, 0.2, bigger))
    committing.join(0.5)
    assert committing.is_alive()
    gate.set()
    committing.join(30)
    assert not committing.is_alive() and store.flush(timeout=30)
    assert store.stats["last_stall_seconds"] >= 0.5
    assert bigger.exists(), "a folder outside the staging root is the trainer's: never deleted"


def test_without_a_full_staging_disk_commit_returns_before_the_upload(tmp_path, make_store, monkeypatch):
    store, gate = _gated_store(make_store, tmp_path / "ckpt", monkeypatch, max_staging_bytes=10**9)
    first, _ = save(store, 1)
    second, _ = save(store, 2)
    assert not first.done() and not second.done()
    gate.set()
    assert store.flush(timeout=30) and second.result().step == 2


# --- retention -----------------------------------------------------------------------------------

def test_retention_over_a_long_run_keeps_exactly_the_expected_set(uri, make_store):
    sibling = make_store(uri + "b")  # ".../run-ab": a prefix of it is this run's URI
    for step in (1, 2, 3):
        saved(sibling, step)
    sibling_files = sibling.location.list_files(sibling.location.root)
    store = make_store(uri, keep_last=3, keep_every_epochs=4)
    loc = store.location
    loc.write_bytes(loc.path("step-00000005", "rng.pt"), b"young upload, no manifest yet")
    loc.write_bytes(loc.path("step-00000999", "rng.pt"), b"a newer upload in progress elsewhere")

    steps = range(10, 301, 10)  # 30 checkpoints, epochs 1/3 ... 10
    futures = [save(store, step, epoch=step / 30)[0] for step in steps]
    assert store.flush(timeout=300) and [f.result().step for f in futures] == list(steps)

    # the last 3, the first at or after epochs 4 and 8 (steps 120, 240), and the folders without a manifest
    assert store.list_steps() == [5, 120, 240, 280, 290, 300, 999]
    assert all(store.verify(step).step == step for step in (120, 240, 280, 290, 300))
    assert store.apply_retention() == [], "nothing more to delete: idempotent"
    loc.remove_tree(loc.path("step-00000010"))  # deleting what is already gone is fine
    assert sibling.location.list_files(sibling.location.root) == sibling_files
    assert sibling.list_steps() == [1, 2, 3]


def test_retention_never_deletes_the_newest_checkpoint(uri, make_store):
    store = make_store(uri, keep_last=1)
    for step in (10, 20, 30):
        saved(store, step)
    assert store.list_steps() == [30] and store.latest_verified().step == 30


def test_abandoned_uploads_are_cleaned_once_old(tmp_path, make_store):
    store = make_store(tmp_path / "ckpt", keep_last=2, orphan_grace_seconds=3600)
    loc = store.location
    for step, age in ((3, 7200), (4, 60)):
        path = loc.path(f"step-0000000{step}", "rng.pt")
        loc.write_bytes(path, b"killed mid-upload")
        os.utime(path, (time.time() - age, time.time() - age))
    for step in (10, 20, 30):
        saved(store, step)
    assert store.list_steps() == [4, 20, 30]


# --- credentials, export, URIs -------------------------------------------------------------------

@pytest.mark.s3
def test_credentials_never_appear_in_logs_or_metrics(s3_server, s3_uri, make_store, tmp_path, caplog):
    registry = CollectorRegistry()
    caplog.set_level(logging.DEBUG)
    store = make_store(s3_uri, registry=registry)
    saved(store, 10)
    store.restore_latest(tmp_path / "resume")
    unreachable = make_store(s3_uri, endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}", registry=registry,
                             retry=RetryPolicy(first_delay=0.01, max_delay=0.05, give_up_after=0.3))
    with pytest.raises(CheckpointUploadError):
        save(unreachable, 20)[0].result(timeout=30)

    secret, key = s3_server.secret_key, s3_server.access_key
    assert secret not in caplog.text
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("dlmctl"))
    assert "step 20 NOT saved" in ours and key not in ours
    for text in (repr(store), str(store.location), repr(store.location), repr(s3_server),
                 generate_latest(registry).decode(), json.dumps(store.stats)):
        assert secret not in text and key not in text


def test_export_writes_and_reads_back_the_final_weights(uri, tmp_path):
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_bytes(os.urandom(4096))
    config.write_text('{"n_layer": 2}')
    export_uri = write_export(uri, {"model.safetensors": weights, "config.json": config})
    assert export_uri.endswith("/run-a/export")
    back = read_export(uri, tmp_path / "back")
    assert (back / "model.safetensors").read_bytes() == weights.read_bytes()
    assert (back / "config.json").read_text() == config.read_text()
    with pytest.raises(ValueError, match="plain names"):
        write_export(uri, {"../escape.bin": weights})


def test_uris_name_s3_prefixes_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    s3 = open_location("s3://bucket/experiments/run-a/")
    assert (s3.uri, s3.root, s3.path("step-00000001")) == (
        "s3://bucket/experiments/run-a", "bucket/experiments/run-a", "bucket/experiments/run-a/step-00000001")
    assert s3.fs.endpoint_url == "http://127.0.0.1:1"
    assert "s3cr3t-value" not in repr(s3) and "AKIAEXAMPLE" not in repr(s3)
    assert not s3.contains("bucket/experiments/run-ab/step-00000001")
    assert open_location(f"file://{tmp_path}/x").root == str(tmp_path / "x")
    monkeypatch.chdir(tmp_path)
    assert open_location("runs/a").root == str(tmp_path / "runs" / "a")
    for bad in ("gs://bucket/x", "s3://", "s3://key:secret@bucket/x", "s3://bucket//x", ""):
        with pytest.raises(ValueError):
            open_location(bad)
    with pytest.raises(ValueError):
        s3.path("../run-b/step-00000001")
    with pytest.raises(ValueError, match="outside"):
        s3.remove_tree("bucket/experiments/run-ab")
