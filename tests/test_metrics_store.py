"""A run's metrics live in its checkpoint store too: `<checkpoint.uri>/<run>/metrics.jsonl` is the local
file's copy, kept current in the background, next to run.json, tokenizer.json and data.json; a run
recreated on an empty disk picks its events up from there and ends with the uninterrupted run's events."""
import json
import signal
import time
import uuid

import pytest

from dlmctl.spec import Run
from dlmctl.spec.contracts import METRICS_FILE, CheckpointEvent, fold_progress, parse_event
from dlmctl.trainer.checkpoint_store import CheckpointStore
from dlmctl.trainer.manifest import CheckpointInfo
from dlmctl.trainer.metrics import MetricsMirror, TrainMetrics, build_event, event_line
from dlmctl.trainer.retries import RetryPolicy
from dlmctl.trainer.training_state import Resumed, restore_metrics
from trainer_runs import events, kill_tree, launch, tiny_run, wait_until

pytestmark = pytest.mark.s3
VOLATILE = {"time", "tokens_per_second", "mfu"}  # differ between two runs of the same numbers


def store_path(uri: str, *parts: str) -> str:
    return "/".join([uri.removeprefix("s3://").rstrip("/"), *parts])


def typed(data: bytes) -> list:
    return [parse_event(json.loads(line)) for line in data.splitlines()]


def curve(data: bytes) -> list[dict]:
    """The train and eval events, in file order, less what differs between two runs of the same numbers."""
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in data.splitlines()
            if json.loads(line)["event"] in ("train", "eval")]


def train(step: int, loss: float = 1.0):
    return build_event("train", step=step, total_steps=100, epoch=step / 10, tokens=step * 64, train_loss=loss)


# ---- the mirror and the restore, on their own -------------------------------------------------------


def test_the_mirror_uploads_urgent_events_at_once_others_periodically_and_flushes_everything(tmp_path, s3_uri,
                                                                                              s3_server):
    store = CheckpointStore(s3_uri, staging_root=tmp_path / "staging", registry=None)
    local = tmp_path / METRICS_FILE
    metrics = TrainMetrics(tiny_run(), local, serve=False)
    mirror = MetricsMirror(local, store.location, retry=RetryPolicy(first_delay=0.1, give_up_after=30),
                           name=METRICS_FILE, interval=3600, once={"run.json": b'{"name": "r"}'})
    metrics.on_event = mirror.event_written
    fs = s3_server.filesystem()
    remote = store_path(s3_uri, METRICS_FILE)
    try:
        for step in range(1, 51):  # train events: not worth an upload each, and never a wait
            metrics.write("train", **train(step).model_dump(exclude={"event", "time"}))
        metrics.write("eval", step=50, total_steps=100, epoch=5.0, tokens=3200, val_loss=2.0, val_loss_stderr=0.1)
        deadline = time.monotonic() + 30
        while not (fs.exists(remote) and fs.cat_file(remote) == local.read_bytes()):
            assert time.monotonic() < deadline, "an eval event reaches the store at once"
            time.sleep(0.05)
        assert mirror.uploads <= 3, "changes made while an upload runs are coalesced into the next one"
        assert fs.cat_file(store_path(s3_uri, "run.json")) == b'{"name": "r"}'

        metrics.write("train", **train(51).model_dump(exclude={"event", "time"}))
        time.sleep(0.5)
        assert fs.cat_file(remote) != local.read_bytes(), "a train event waits for the interval"
        assert mirror.close(timeout=30)
        assert fs.cat_file(remote) == local.read_bytes(), "a flush uploads everything written before it"
    finally:
        mirror.close(timeout=0)
        store.close()


def write_events(path, *events) -> bytes:
    data = b"".join(event_line(e).encode() for e in events)
    path.write_bytes(data)
    return data


def test_a_fresh_pod_takes_the_stores_events_up_to_its_checkpoint(tmp_path, s3_uri):
    store = CheckpointStore(s3_uri, staging_root=tmp_path / "staging", registry=None)
    pod1 = tmp_path / "pod1" / METRICS_FILE
    pod1.parent.mkdir()
    checkpoint = build_event("checkpoint", step=4, epoch=0.4, uri=f"{store.uri}/step-00000004")
    written = write_events(pod1, train(1), train(2), train(3), train(4), train(5), checkpoint, train(6))
    store.location.write_bytes(store.location.path(METRICS_FILE), written + b'{"event": "train", "st')
    fresh = tmp_path / "pod2" / METRICS_FILE
    fresh.parent.mkdir()
    try:
        restore_metrics(store, fresh, Resumed(step=4))
    finally:
        store.close()

    assert [(e.event, e.step) for e in typed(fresh.read_bytes())] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("checkpoint", 4)], \
        "events past the checkpoint (logged again) and a torn line are dropped"


def test_when_the_stores_copy_lags_behind_the_checkpoint_its_own_copy_of_the_events_is_used(tmp_path, s3_uri):
    store = CheckpointStore(s3_uri, staging_root=tmp_path / "staging", registry=None)
    lagging = b"".join(event_line(e).encode() for e in (train(1), train(2)))
    store.location.write_bytes(store.location.path(METRICS_FILE), lagging)
    saved_with = b"".join(event_line(e).encode() for e in (train(1), train(2), train(3), train(4)))
    info = CheckpointInfo(4, 0.4, "step-00000004", f"{store.uri}/step-00000004", 1234.5, ())
    fresh = tmp_path / METRICS_FILE
    try:
        restore_metrics(store, fresh, Resumed(step=4, checkpoint=info, events=saved_with))
    finally:
        store.close()

    restored = typed(fresh.read_bytes())
    assert [(e.event, e.step) for e in restored] == [("train", 1), ("train", 2), ("train", 3), ("train", 4),
                                                     ("checkpoint", 4)]
    assert restored[-1] == CheckpointEvent(event="checkpoint", time=1234.5, step=4, epoch=0.4, uri=info.uri)


# ---- the real trainer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(s3_server, tmp_path_factory):
    """A run checkpointing to S3, start to end: the events every interrupted run must reproduce."""
    uri = f"s3://{s3_server.bucket}/uninterrupted-{uuid.uuid4().hex[:8]}"
    run = tiny_run("diffusion", checkpoint={"uri": uri, "endpoint_url": s3_server.endpoint_url, "keep_last": 16})
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    launch(run, out, env=s3_server.env())
    return run, out, f"{uri}/{run.name}"


def test_a_run_keeps_its_metrics_and_its_files_in_the_store(uninterrupted, s3_server):
    run, out, store = uninterrupted
    fs = s3_server.filesystem()
    stored = fs.cat_file(store_path(store, METRICS_FILE))
    assert stored == (out / METRICS_FILE).read_bytes(), "the same bytes as the local file"
    assert Run.model_validate_json(fs.cat_file(store_path(store, "run.json"))) == run
    for name in ("tokenizer.json", "data.json"):
        assert fs.cat_file(store_path(store, name)) == (out / name).read_bytes(), name

    checkpoints = [e for e in typed(stored) if isinstance(e, CheckpointEvent)]
    interval, total = run.spec.checkpoint.interval_steps, run.spec.total_steps
    assert [c.step for c in checkpoints] == list(range(interval, total + 1, interval))
    for c in checkpoints:
        assert c.uri == f"{store}/step-{c.step:08d}"
        assert fs.exists(store_path(c.uri, "manifest.json")), f"{c.uri}: the event names a complete checkpoint"

    progress = fold_progress(e for e in typed(stored) if e is not None)
    last_train = events(out, "train")[-1]
    assert (progress.step, progress.total_steps, progress.done) == (total, total, True)
    assert progress.train_loss == last_train["train_loss"]
    assert progress.val_loss == events(out, "eval")[-1]["val_loss"]
    assert (progress.last_checkpoint, progress.last_checkpoint_step) == (checkpoints[-1].uri, total)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["SIGTERM", "SIGKILL"])
def test_a_run_killed_and_recreated_on_an_empty_disk_ends_with_the_uninterrupted_events(
        tmp_path, s3_uri, s3_server, uninterrupted, kill):
    reference_run, reference, _ = uninterrupted
    checkpoint = {"uri": s3_uri, "endpoint_url": s3_server.endpoint_url, "keep_last": 16}
    run = tiny_run("diffusion", checkpoint=checkpoint)
    store = f"{s3_uri}/{run.name}"
    fs = s3_server.filesystem()
    manifests = lambda: len(fs.glob(store_path(store, "step-*", "manifest.json")))  # noqa: E731

    first = launch(run, tmp_path / "pod1", wait=False)
    if kill == "SIGTERM":  # a preemption: the pod checkpoints where it stopped and flushes its metrics
        wait_until(first, lambda: len(events(tmp_path / "pod1", "train")) >= 6)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) != 0
    else:  # the node is gone: nothing is flushed, the store's metrics may lag behind its checkpoints
        wait_until(first, lambda: manifests() >= 2)
        kill_tree(first.pid)
        first.wait()
    killed_at = max(e["step"] for e in events(tmp_path / "pod1", "train"))
    launch(run, tmp_path / "pod2")

    stored = fs.cat_file(store_path(store, METRICS_FILE))
    assert stored == (tmp_path / "pod2" / METRICS_FILE).read_bytes()
    assert curve(stored) == curve((reference / METRICS_FILE).read_bytes()), "no step lost, none twice"
    starts = [e.step for e in typed(stored) if e.event == "start"]
    assert starts[0] == 0 and 0 < starts[1] <= killed_at and len(starts) == 2
    if kill == "SIGTERM":
        assert starts[1] == killed_at, "the preempted pod saved a checkpoint where it stopped"
    progress = fold_progress(e for e in typed(stored) if e is not None)
    assert (progress.step, progress.done) == (reference_run.spec.total_steps, True)
    assert progress.train_loss == events(reference, "train")[-1]["train_loss"]
