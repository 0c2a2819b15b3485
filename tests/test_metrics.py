"""Training metrics: Prometheus exposition on rank 0 with base units, `_total` counters and run labels, and
the same values as the typed events of spec.contracts in metrics.jsonl."""
import json

import pytest
from pydantic import ValidationError

from dlmctl.spec.contracts import CheckpointEvent, EvalEvent, TrainEvent, parse_event
from dlmctl.trainer.manifest import CheckpointInfo
from dlmctl.trainer.metrics import TrainMetrics
from exposition import Exposition
from testenv.cluster import free_port
from trainer_runs import tiny_run


def test_metrics_are_served_for_prometheus_and_written_to_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("DLMCTL_METRICS_ADDR", "127.0.0.1")
    port = free_port()
    run = tiny_run("diffusion", name="exp", sweep={"data.epochs": [2]})
    metrics = TrainMetrics(run, tmp_path / "metrics.jsonl", port=port)
    phases = {"data": 0.1, "forward_backward": 0.3, "optimizer": 0.1}
    for step in (1, 2):
        metrics.train_step(step=step, total_steps=2, epoch=step / 2, tokens=step * 4096, loss=5.0 - step, lr=1e-3,
                           step_seconds=0.5, phase_seconds=phases, tokens_per_second=8192.0, mfu=0.4)
    metrics.evaluation(step=2, total_steps=2, epoch=1.0, tokens=8192, val_loss=4.5, val_loss_stderr=0.01,
                       choice_accuracy=0.75)

    page = Exposition.scrape(f"http://127.0.0.1:{port}/metrics")
    labels = {"experiment": "exp", "run": run.name, "arm": "diffusion", "point": "data.epochs=2"}
    assert {"dlm_train_steps_total": 2, "dlm_train_tokens_total": 8192, "dlm_train_loss": 3.0,
            "dlm_validation_loss": 4.5, "dlm_validation_loss_stderr": 0.01, "dlm_validation_tokens": 8192,
            "dlm_train_epoch": 1.0, "dlm_train_learning_rate": 1e-3, "dlm_train_tokens_per_second": 8192.0,
            "dlm_train_mfu_ratio": 0.4, "dlm_choice_accuracy_ratio": 0.75,
            "dlm_train_step_duration_seconds_count": 2} == {name: page.value(name, **labels) for name in (
                "dlm_train_steps_total", "dlm_train_tokens_total", "dlm_train_loss", "dlm_validation_loss",
                "dlm_validation_loss_stderr", "dlm_validation_tokens", "dlm_train_epoch", "dlm_train_learning_rate",
                "dlm_train_tokens_per_second", "dlm_train_mfu_ratio", "dlm_choice_accuracy_ratio",
                "dlm_train_step_duration_seconds_count")}
    assert page.value("dlm_train_step_phase_seconds_total", **labels, phase="forward_backward") == pytest.approx(0.6)
    assert page.value("dlm_run_info", **labels, sweep_data_epochs="2") == 1
    assert not any("step" in l for s in page.samples for l in s.labels), "step numbers never become labels"

    events = [parse_event(json.loads(line)) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [type(e) for e in events] == [TrainEvent, TrainEvent, EvalEvent]
    assert events[-1].val_loss == 4.5 and events[1].train_loss == 3.0 and events[1].mfu == 0.4


def test_every_line_is_built_through_the_contract_so_a_renamed_field_breaks_the_writer(tmp_path):
    path = tmp_path / "metrics.jsonl"
    seen = []
    metrics = TrainMetrics(tiny_run(), path, serve=False, on_event=seen.append)
    with pytest.raises(TypeError, match="a train event has no field loss"):
        metrics.write("train", step=1, total_steps=2, epoch=0.5, tokens=4096, loss=3.0)
    with pytest.raises(ValidationError):
        metrics.write("done", step=2)  # total_steps, epoch and tokens are required
    with pytest.raises(ValueError, match="not a metrics event"):
        metrics.write("progress", step=2)
    assert not path.exists() and seen == [], "nothing written for an event the contract refuses"

    metrics.write("train", step=1, total_steps=2, epoch=0.5, tokens=4096, train_loss=float("nan"))
    metrics.checkpoint_saved(CheckpointInfo(1, 0.5, "step-00000001", "s3://b/r/step-00000001", 0.0, ()))
    train, checkpoint = [json.loads(line) for line in path.read_text().splitlines()]
    assert "train_loss" not in train and "lr" not in train, "non-finite and absent values are left out"
    assert parse_event(checkpoint) == CheckpointEvent(event="checkpoint", time=checkpoint["time"], step=1, epoch=0.5,
                                                      uri="s3://b/r/step-00000001")
    assert seen == ["train", "checkpoint"]
