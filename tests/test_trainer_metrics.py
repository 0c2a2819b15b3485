"""A real training run's Prometheus series: every trainer and checkpoint metric of the catalogue
(spec.metrics), labelled with the run's experiment, run, arm and sweep point, holding exactly what its
metrics.jsonl events say; the step phases account for the steps' wall time."""
import json
import math
import os
import subprocess
import sys
import time

import pytest

from dlmctl.spec.metrics import (
    CHECKPOINT_METRICS, RUN_INFO, RUN_LABELS, STEP_PHASE_SECONDS, STEP_PHASES, TRAINER_METRICS, run_labels,
)
from exposition import Exposition
from trainer_runs import free_port, tiny_run

# The trainer's own entry point, kept alive after training so its /metrics can be read as it ended.
TRAIN_THEN_SERVE = """
import sys
from pathlib import Path
from dlmctl.spec import Run
from dlmctl.trainer.loop import train
code = train(Run.model_validate_json(sys.argv[1]), Path(sys.argv[2]))
print("trained", code, flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(run, its events by kind, its exposition, the wall time of the whole process up to the end of training,
    its output folder)."""
    output = tmp_path_factory.mktemp("run") / "out"
    port = free_port()
    run = tiny_run("diffusion", name="metrics", sweep={"data.epochs": [1]}, metrics={"port": port})
    env = {**os.environ, "DLMCTL_METRICS_ADDR": "127.0.0.1", "DLMCTL_PEAK_FLOPS": "1e12",
           "OMP_NUM_THREADS": "1"}
    log = open(output.parent / "trainer.log", "wb")
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_THEN_SERVE, run.model_dump_json(), str(output)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = "-"
        while line and not line.startswith("trained"):  # DeepSpeed prints to stdout too
            line = proc.stdout.readline()
        wall = time.perf_counter() - began
        assert line.strip() == "trained 0", (output.parent / "trainer.log").read_text()[-4000:]
        page = Exposition.scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    events: dict[str, list[dict]] = {}
    for record in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()):
        events.setdefault(record["event"], []).append(record)
    return run, events, page, wall, output


def test_every_series_of_the_catalogue_is_served_with_the_runs_labels(finished_run):
    run, _, page, _, _ = finished_run
    labels = run_labels(run)
    assert labels == {"experiment": "metrics", "run": run.name, "arm": "diffusion", "point": "data.epochs=1"}
    for metric in TRAINER_METRICS + CHECKPOINT_METRICS:
        found = page.labels(metric.series)
        assert found, f"{metric.series} is not served"
        for series in found:
            assert {k: series[k] for k in RUN_LABELS} == labels, (metric.series, series)
    assert page.value(RUN_INFO.series, **labels, sweep_data_epochs="1") == 1


def test_the_series_hold_what_the_events_say(finished_run):
    run, events, page, _, _ = finished_run
    labels = run_labels(run)
    train, evaluation, done = events["train"][-1], events["eval"][-1], events["done"][-1]

    def value(name):
        return page.value(name, **labels)

    assert value("dlm_train_steps_total") == train["step"] == done["step"] == run.spec.total_steps
    assert value("dlm_train_planned_steps") == events["start"][0]["total_steps"] == run.spec.total_steps
    assert value("dlm_train_tokens_total") == train["tokens"] == done["tokens"]
    assert value("dlm_train_epoch") == train["epoch"]
    assert value("dlm_train_planned_epochs") == done["epoch"]
    assert value("dlm_train_loss") == train["train_loss"]
    assert value("dlm_train_learning_rate") == train["lr"]
    assert value("dlm_train_tokens_per_second") == train["tokens_per_second"]
    assert value("dlm_train_mfu_ratio") == train["mfu"]
    assert value("dlm_train_step_duration_seconds_count") == len(events["train"])  # one event per step here
    assert value("dlm_validation_loss") == evaluation["val_loss"]
    assert value("dlm_validation_loss_stderr") == evaluation["val_loss_stderr"]
    assert value("dlm_validation_tokens") == evaluation["tokens"]
    assert value("dlm_choice_accuracy_ratio") == evaluation["choice_accuracy"]


def test_the_checkpoint_series_count_the_checkpoints_the_events_record(finished_run):
    run, events, page, _, _ = finished_run
    labels = run_labels(run)
    saved = events["checkpoint"]
    assert len(saved) == run.spec.total_steps // run.spec.checkpoint.interval_steps
    assert page.value("dlm_checkpoint_save_duration_seconds_count", **labels) == len(saved)
    assert page.value("dlm_checkpoint_stall_seconds_count", **labels) == len(saved)
    assert page.value("dlm_checkpoint_upload_bytes_total", **labels) > 0
    assert page.value("dlm_checkpoint_last_success_timestamp_seconds", **labels) == pytest.approx(
        saved[-1]["time"], abs=5)
    for idle in ("dlm_checkpoint_upload_retries_total", "dlm_checkpoint_upload_failures_total",
                 "dlm_checkpoint_staged_bytes", "dlm_checkpoint_store_unreachable_since_timestamp_seconds"):
        assert page.value(idle, **labels) == 0, idle


def test_the_step_phases_split_the_steps_wall_time(finished_run):
    run, _, page, wall, _ = finished_run
    labels = run_labels(run)
    seconds = {phase: page.value(STEP_PHASE_SECONDS.series, **labels, phase=phase) for phase in STEP_PHASES}
    assert all(value > 0 for value in seconds.values()), seconds
    assert sum(seconds.values()) <= wall
    in_steps = seconds["data"] + seconds["forward_backward"] + seconds["optimizer"]
    assert in_steps == pytest.approx(page.value("dlm_train_step_duration_seconds_sum", **labels), rel=1e-6)
    assert seconds["checkpoint_stall"] >= page.value("dlm_checkpoint_stall_seconds_sum", **labels), \
        "the loop's wait for a checkpoint includes the store's part of it"


def test_an_evaluation_reports_bits_per_byte_the_accuracys_error_flops_and_the_training_loss(finished_run):
    run, events, _, _, output = finished_run
    [evaluation] = events["eval"]  # one, at the end: the interval is longer than the run
    data = json.loads((output / "data.json").read_text())
    bytes_per_token = data["validation_bytes"] / data["validation_tokens"]
    assert evaluation["val_bits_per_byte"] == pytest.approx(evaluation["val_loss"] / bytes_per_token / math.log(2))
    a, n = evaluation["choice_accuracy"], run.spec.eval.choice_task.examples
    assert evaluation["choice_accuracy_stderr"] == pytest.approx(math.sqrt(a * (1 - a) / n))
    # every step logged its loss (log_interval_steps: 1): the evaluation's is their mean
    step_losses = [e["train_loss"] for e in events["train"]]
    assert len(step_losses) == evaluation["step"] == run.spec.total_steps
    assert evaluation["train_loss"] == pytest.approx(sum(step_losses) / len(step_losses), rel=1e-12)

    from dlmctl.trainer.runs import build_model

    per_token = build_model(run, data["vocab_size"]).flops_per_token(run.spec.data.seq_len, causal=False)
    assert evaluation["flops"] == pytest.approx(per_token * evaluation["tokens"], rel=1e-12)
