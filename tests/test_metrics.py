"""Training metrics: Prometheus exposition on rank 0 with base units, `_total` counters and run labels."""
import json
import urllib.request

from dlmctl.trainer.metrics import TrainMetrics
from trainer_runs import free_port


def test_metrics_are_served_for_prometheus_and_written_to_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("DLMCTL_METRICS_ADDR", "127.0.0.1")
    port = free_port()
    metrics = TrainMetrics("exp", "exp-dlm", "diffusion", tmp_path / "metrics.jsonl", port=port)
    for step in (1, 2):
        metrics.train_step(step=step, total_steps=2, epoch=step / 2, tokens=step * 4096, step_tokens=4096,
                           loss=5.0 - step, lr=1e-3, step_seconds=0.5, tokens_per_second=8192.0, mfu=0.4)
    metrics.evaluation(step=2, total_steps=2, epoch=1.0, tokens=8192, val_loss=4.5, val_loss_stderr=0.01,
                       choice_accuracy=0.75)

    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    labels = 'experiment="exp",objective="diffusion",run="exp-dlm"'
    for line in (f"dlm_train_steps_total{{{labels}}} 2.0", f"dlm_train_tokens_total{{{labels}}} 8192.0",
                 f"dlm_train_loss{{{labels}}} 3.0", f"dlm_train_validation_loss{{{labels}}} 4.5",
                 f"dlm_train_epoch{{{labels}}} 1.0", f"dlm_train_learning_rate{{{labels}}} 0.001",
                 f"dlm_train_tokens_per_second{{{labels}}} 8192.0", f"dlm_train_mfu_ratio{{{labels}}} 0.4",
                 f"dlm_train_eval_accuracy_ratio{{{labels}}} 0.75",
                 f"dlm_train_step_duration_seconds_count{{{labels}}} 2.0"):
        assert line in page, line
    assert "step=" not in page, "step numbers never become labels"

    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["train", "train", "eval"]
    assert events[-1]["val_loss"] == 4.5 and events[1]["train_loss"] == 3.0
