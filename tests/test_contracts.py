"""The contracts between processes (spec/contracts.py): the experiment-phase rule, the metrics events, and
following a run's metrics in its S3 store as the operator does."""
from __future__ import annotations

import json

import pytest

from dlmctl.operator.progress import ProgressReader
from dlmctl.spec import experiment_from_dict
from dlmctl.spec.contracts import ExperimentPhase, RunPhase, experiment_phase, fold_progress, parse_event


@pytest.mark.parametrize("runs, expected", [
    ([], "Pending"),
    (["Pending", "Unschedulable"], "Pending"),
    (["Pending", "Running"], "Running"),
    (["Succeeded", "Preempted"], "Running"),
    (["Succeeded", "Restarting"], "Running"),
    (["Succeeded", "Succeeded"], "Succeeded"),
    (["Succeeded", "Failed"], "Failed"),
    (["Failed", "Cancelled", "Succeeded"], "Cancelled"),
    (["Cancelled", "Running"], "Running"),
])
def test_the_experiment_phase_follows_from_its_runs(runs, expected):
    assert experiment_phase(runs) is ExperimentPhase(expected)
    assert experiment_phase([RunPhase(r) for r in runs]) is ExperimentPhase(expected)


def test_every_run_phase_is_terminal_or_not_exactly_once():
    assert {p.value for p in RunPhase if p.terminal} == {"Succeeded", "Failed", "Cancelled"}
    assert ExperimentPhase.Invalid.terminal and not ExperimentPhase.Running.terminal


EVENTS = [
    {"event": "start", "time": 1.0, "step": 0, "total_steps": 8, "world_size": 2, "parameters": 10,
     "unigram_entropy": 5.5},
    {"event": "train", "time": 2.0, "step": 1, "total_steps": 8, "epoch": 0.25, "tokens": 100, "train_loss": 6.0},
    {"event": "eval", "time": 3.0, "step": 1, "total_steps": 8, "epoch": 0.25, "tokens": 100, "val_loss": 6.2,
     "val_loss_stderr": 0.1, "choice_accuracy": 0.5},
    {"event": "checkpoint", "time": 3.5, "step": 1, "epoch": 0.25, "uri": "s3://b/x/step-00000001"},
    {"event": "train", "time": 4.0, "step": 2, "total_steps": 8, "epoch": 0.5, "tokens": 200, "train_loss": 5.0},
    {"event": "something-else", "time": 4.5},
    {"event": "done", "time": 5.0, "step": 2, "total_steps": 8, "epoch": 0.5, "tokens": 200},
]


def test_progress_is_the_latest_value_of_each_field():
    p = fold_progress(e for e in map(parse_event, EVENTS) if e is not None)
    assert (p.step, p.total_steps, p.epoch, p.tokens) == (2, 8, 0.5, 200)
    assert (p.train_loss, p.val_loss, p.val_loss_stderr, p.choice_accuracy) == (5.0, 6.2, 0.1, 0.5)
    assert (p.unigram_entropy, p.last_checkpoint, p.last_checkpoint_step, p.done) == (
        5.5, "s3://b/x/step-00000001", 1, True)
    assert p.evals == [parse_event(EVENTS[2])], "every evaluation is kept: the crossover is found on them"


def test_lines_that_are_not_events_are_skipped_not_errors():
    assert parse_event({"event": "train", "time": 1.0}) is None  # missing fields
    assert parse_event(["not", "a", "dict"]) is None
    assert parse_event({"event": "other", "time": 1.0}) is None


@pytest.mark.s3
def test_the_progress_reader_follows_a_store_file_incrementally_and_notices_a_rewrite(s3_uri, s3_server):
    experiment = experiment_from_dict({"metadata": {"name": "follow"}, "spec": {
        "arms": ["diffusion"], "checkpoint": {"uri": s3_uri}}})
    (run,) = experiment.runs()
    fs = s3_server.filesystem()
    path = f"{s3_uri}/{run.name}/metrics.jsonl"
    lines = [json.dumps(e).encode() + b"\n" for e in EVENTS]
    reader = ProgressReader()
    assert reader.read(run) is None, "no metrics yet"

    fs.pipe(path, b"".join(lines[:2]) + lines[2][:10])  # the third line is still being written
    assert reader.read(run).step == 1 and reader.read(run).val_loss is None
    fs.pipe(path, b"".join(lines))
    whole = fold_progress(e for e in map(parse_event, EVENTS) if e is not None)
    assert reader.read(run) == whole

    # a resumed run rewrites the file without the events past its checkpoint, then logs them again
    fs.pipe(path, b"".join(lines[:4]) + b'{"event": "train", "time": 9.0, "step": 2, "total_steps": 8, '
            b'"epoch": 0.5, "tokens": 200, "train_loss": 4.5}\n')
    again = reader.read(run)
    assert (again.step, again.train_loss, again.done) == (2, 4.5, False)
    assert again.evals == whole.evals, "the evaluations are read afresh, none twice"


def test_a_runs_status_shows_everything_its_metrics_say_but_bookkeeping():
    from dlmctl.spec.contracts import RunProgress
    from dlmctl.spec.experiment import PROGRESS_STATUS_FIELDS

    assert set(RunProgress.model_fields) - PROGRESS_STATUS_FIELDS == {"done", "last_checkpoint_step", "evals"}
