"""The local backend loses nothing and says nothing false: concurrent submits start an experiment once,
no trainer outlives its supervisor, a reused pid is never taken for ours, failed runs restart and
resume from their checkpoints (as does a resubmitted spec; only --fresh starts over), and a damaged
state file is named, never guessed around. Real supervisors and trainer processes (tests/fake_trainer.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import yaml

from dlmctl.cli.backends.local import LocalBackend
from dlmctl.cli.backends.local_state import pid_alive
from dlmctl.cli.errors import UserError
from dlmctl.spec import load_experiment
from test_local_backend import cli, home, other_folder, run_dir, wait_for, write_spec  # noqa: F401 (home: a fixture)

AR = {"arms": ["autoregressive"]}


def experiment_dir(root, name="tiny"):
    return root / "experiments" / name


def read(path):
    return json.loads(path.read_text())


def lives(root, run="tiny-ar", experiment="tiny"):
    """Each start of the run's trainer: the step it started from and whether it was told to start fresh."""
    path = run_dir(root, experiment, run) / "fake_lives.jsonl"
    return [{k: v for k, v in json.loads(line).items() if k != "pid"} for line in path.read_text().splitlines()]


def trained_steps(root, run="tiny-ar", experiment="tiny"):
    events = map(json.loads, (run_dir(root, experiment, run) / "metrics.jsonl").read_text().splitlines())
    return [e["step"] for e in events if e["event"] == "train"]


def started(root, run="tiny-dlm"):
    wait_for(lambda: (run_dir(root, "tiny", run) / "fake_env.json").exists(), f"{run} to start")
    return read(run_dir(root, "tiny", run) / "state.json")["pid"]


def kill(pid):
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- 1. concurrent submits ------------------------------------------------------------------------


def test_overlapping_submits_of_one_name_start_it_once_and_tell_the_other_it_is_busy(home, tmp_path, monkeypatch):
    experiment = load_experiment(write_spec(tmp_path, **AR))
    real_dump = yaml.safe_dump

    def slow_dump(*args, **kwargs):  # holds a submit between "does it exist?" and creating it
        threading.Event().wait(3)
        return real_dump(*args, **kwargs)

    monkeypatch.setattr(yaml, "safe_dump", slow_dump)
    barrier, results = threading.Barrier(2), []

    def submit():
        barrier.wait()
        try:
            results.append(LocalBackend().submit(experiment))
        except UserError as err:
            results.append(err)

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    monkeypatch.setattr(yaml, "safe_dump", real_dump)

    errors = [r for r in results if isinstance(r, UserError)]
    assert len(results) == 2 and len(errors) == 1, results
    assert "experiment 'tiny' is being changed by another dlmctl command" in str(errors[0])
    wait_for(lambda: LocalBackend().get("tiny").status.phase == "Succeeded", "the experiment to finish")
    assert lives(home) == [{"start": 0, "fresh": False}], "one trainer, started once"
    assert trained_steps(home) == [1, 2, 3, 4]


def test_concurrent_cli_submits_leave_one_supervisor_and_one_trainer_per_run(home, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0.2")
    spec = write_spec(tmp_path)
    submits = [subprocess.Popen([sys.executable, "-m", "dlmctl.cli.app", "submit", str(spec)], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [(p.wait(180), *p.communicate()) for p in submits]

    started_it = [r for r in results if r[0] == 0 and "note: experiment tiny already" not in r[2]]
    assert len(started_it) == 1, results
    for code, out, err in results:
        assert code == 0 or (code == 2 and "experiment 'tiny'" in err and "internal error" not in err), err
    wait_for(lambda: LocalBackend().get("tiny").status.phase == "Succeeded", "the experiment to finish")
    for run in ("tiny-dlm", "tiny-ar"):
        assert len(lives(home, run)) == 1 and trained_steps(home, run) == [1, 2, 3, 4], "no second writer"


# ---- 2. orphans -----------------------------------------------------------------------------------


def test_trainers_die_with_their_supervisor(capsys, home, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_HANG", "diffusion")
    assert cli(capsys, "submit", write_spec(tmp_path))[0] == 0
    trainer = started(home)
    supervisor = read(experiment_dir(home) / "supervisor.json")

    os.kill(supervisor["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(trainer), "the trainer to die with its supervisor")
    from dlmctl.cli.backends.local_state import experiment_processes

    wait_for(lambda: not experiment_processes(os.path.realpath(experiment_dir(home))), "every process of it to end")
    status = LocalBackend().get("tiny").status
    assert [r.phase for r in status.runs] == ["Failed", "Failed"]
    assert status.runs[0].message.startswith("the local supervisor exited before this run finished")
    assert cli(capsys, "cancel", "tiny")[1].strip() == "experiment tiny already finished (Failed)"


def test_torchrun_workers_die_with_their_supervisors_process_group(capsys, home, tmp_path, monkeypatch):
    """torchrun starts its workers in sessions of their own: killing the supervisor's process group kills
    torchrun but not them. The watchdog finds them by the experiment's marker in their environment."""
    monkeypatch.delenv("DLMCTL_LOCAL_LAUNCHER")
    monkeypatch.setenv("FAKE_TRAINER_HANG", "autoregressive")
    assert cli(capsys, "submit", write_spec(tmp_path, **AR))[0] == 0
    wait_for(lambda: (run_dir(home, "tiny", "tiny-ar") / "fake_lives.jsonl").exists(), "the worker to start")
    worker = json.loads((run_dir(home, "tiny", "tiny-ar") / "fake_lives.jsonl").read_text())["pid"]
    supervisor = read(experiment_dir(home) / "supervisor.json")

    os.killpg(supervisor["pgid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(worker), "the torchrun worker to die with its supervisor")
    assert LocalBackend().get("tiny").status.phase == "Failed"


@pytest.mark.parametrize("stop", ["cancel", "submit --replace"])
def test_a_trainer_that_outlived_its_supervisor_shows_running_and_is_stopped(capsys, home, tmp_path, monkeypatch, stop):
    monkeypatch.setenv("FAKE_TRAINER_HANG", "diffusion")
    spec = write_spec(tmp_path)
    assert cli(capsys, "submit", spec)[0] == 0
    trainer = started(home)
    supervisor = read(experiment_dir(home) / "supervisor.json")
    kill(supervisor.get("watchdog", {}).get("pid"))  # the worst case: nothing is left to stop the trainer
    kill(supervisor["pid"])
    wait_for(lambda: not pid_alive(supervisor["pid"]), "the supervisor to die")
    assert pid_alive(trainer)

    dlm = LocalBackend().get("tiny").status.runs[0]
    assert dlm.phase == "Running", "its trainer is still training"
    assert "the local supervisor is gone" in dlm.message and str(trainer) in dlm.message
    if stop == "cancel":
        code, out, _ = cli(capsys, "cancel", "tiny")
        assert (code, out.strip()) == (0, "experiment tiny cancelled")
    else:
        monkeypatch.delenv("FAKE_TRAINER_HANG")
        assert cli(capsys, "submit", spec, "--replace", "--wait")[0] == 0
        assert len(lives(home, "tiny-dlm")) == 2
    assert not pid_alive(trainer)


# ---- 3. reused pids -------------------------------------------------------------------------------


def test_a_reused_pid_is_never_taken_for_the_supervisor_or_a_trainer(capsys, home, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_HANG", "diffusion")
    assert cli(capsys, "submit", write_spec(tmp_path))[0] == 0
    trainer = started(home)
    supervisor_json, state_json = experiment_dir(home) / "supervisor.json", run_dir(home, "tiny", "tiny-dlm") / "state.json"
    supervisor, state = read(supervisor_json), read(state_json)
    for pid in (supervisor.get("watchdog", {}).get("pid"), supervisor["pid"], trainer):  # all at once, as in a reboot
        kill(pid)
    wait_for(lambda: not pid_alive(supervisor["pid"]) and not pid_alive(trainer), "everything to die")

    # An unrelated process now has the pids the state files name (with the starts they recorded).
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        supervisor_json.write_text(json.dumps({**supervisor, "pid": stranger.pid, "pgid": stranger.pid}))
        state_json.write_text(json.dumps({**state, "pid": stranger.pid}))
        status = LocalBackend().get("tiny").status
        assert (status.phase, [r.phase for r in status.runs]) == ("Failed", ["Failed", "Failed"])
        assert cli(capsys, "cancel", "tiny")[1].strip() == "experiment tiny already finished (Failed)"
        LocalBackend().cancel("tiny")  # asked directly, it still signals nothing that is not the experiment's
        assert stranger.poll() is None, "the unrelated process was not signalled"
    finally:
        stranger.kill()
        stranger.wait()


# ---- 4. restarts and resume -----------------------------------------------------------------------


@pytest.fixture
def checkpointing(monkeypatch):
    """The fake trainer checkpoints every step and resumes from its newest checkpoint."""
    monkeypatch.setenv("FAKE_TRAINER_CHECKPOINTS", "1")
    monkeypatch.setenv("FAKE_TRAINER_STEPS", "6")


def test_a_killed_trainer_is_restarted_and_resumes_from_its_newest_checkpoint(capsys, home, tmp_path, monkeypatch,
                                                                              checkpointing):
    monkeypatch.setenv("FAKE_TRAINER_KILL_AT", "4")  # kill -9 in its first life, after checkpointing step 3
    code, out, err = cli(capsys, "submit", write_spec(tmp_path, **AR), "--wait")
    assert code == 0, err
    run = LocalBackend().get("tiny").status.runs[0]
    assert (run.phase, run.restarts, run.step) == ("Succeeded", 1, 6)
    assert lives(home) == [{"start": 0, "fresh": False}, {"start": 3, "fresh": False}]
    assert trained_steps(home) == [1, 2, 3, 4, 5, 6], "every step once: the resumed life did not start over"


def test_a_run_waiting_to_restart_is_restarting_and_counts_its_restarts(capsys, home, tmp_path, monkeypatch,
                                                                        checkpointing):
    monkeypatch.setenv("FAKE_TRAINER_KILL_AT", "3")
    monkeypatch.setenv("DLMCTL_RESTART_BACKOFF", "200")
    assert cli(capsys, "submit", write_spec(tmp_path, **AR))[0] == 0
    wait_for(lambda: LocalBackend().get("tiny").status.runs[0].phase == "Restarting", "the run to wait for its restart")
    status = LocalBackend().get("tiny").status
    assert (status.phase, status.runs[0].restarts) == ("Running", 1)
    assert status.runs[0].message == ("trainer killed by SIGKILL; restart 1 of 3 in 200s, "
                                      "resuming from its checkpoint at step 2")
    assert cli(capsys, "cancel", "tiny")[0] == 0
    run = LocalBackend().get("tiny").status.runs[0]
    assert (run.phase, run.message) == ("Cancelled", "cancelled while waiting to restart")


@pytest.mark.parametrize("exit_code, max_restarts, starts, message", [
    (2, 3, 1, "trainer exited with code 2: a mistake in the spec or its data, which a restart would repeat"),
    (3, 2, 3, "trainer exited with code 3 after 2 restarts (spec.scheduling.max_restarts: 2)"),
])
def test_restarts_stop_at_max_restarts_and_a_user_error_is_never_restarted(capsys, home, tmp_path, monkeypatch,
                                                                           exit_code, max_restarts, starts, message):
    monkeypatch.setenv("FAKE_TRAINER_FAIL", "autoregressive")
    monkeypatch.setenv("FAKE_TRAINER_FAIL_CODE", str(exit_code))
    spec = write_spec(tmp_path, scheduling={"max_restarts": max_restarts}, **AR)
    assert cli(capsys, "submit", spec, "--wait")[0] == 1
    run = LocalBackend().get("tiny").status.runs[0]
    assert (run.phase, run.restarts) == ("Failed", starts - 1)
    assert run.message == f"{message}; see `dlmctl logs tiny --run tiny-ar`"
    assert len(lives(home)) == starts


def test_torchrun_passes_on_the_trainers_user_error_so_it_is_not_restarted(capsys, home, tmp_path, monkeypatch):
    monkeypatch.delenv("DLMCTL_LOCAL_LAUNCHER")  # torchrun exits 1 whatever its worker's code; its report says which
    monkeypatch.setenv("FAKE_TRAINER_FAIL", "autoregressive")
    monkeypatch.setenv("FAKE_TRAINER_FAIL_CODE", "2")
    assert cli(capsys, "submit", write_spec(tmp_path, **AR), "--wait")[0] == 1
    run = LocalBackend().get("tiny").status.runs[0]
    assert (run.phase, run.restarts, run.reason) == ("Failed", 0, "UserError")
    assert run.message.startswith("trainer exited with code 2: a mistake in the spec")


def test_submitting_the_same_spec_again_resumes_an_unfinished_run(capsys, home, tmp_path, monkeypatch, checkpointing):
    monkeypatch.setenv("FAKE_TRAINER_KILL_AT", "4")
    spec = write_spec(tmp_path, scheduling={"max_restarts": 0}, **AR)
    assert cli(capsys, "submit", spec, "--wait")[0] == 1
    assert LocalBackend().get("tiny").status.runs[0].step == 3

    code, out, err = cli(capsys, "submit", spec, "--wait")
    assert code == 0, err
    assert "tiny-ar resumes from its checkpoint at step 3" in err
    assert lives(home) == [{"start": 0, "fresh": False}, {"start": 3, "fresh": False}]
    assert trained_steps(home) == [1, 2, 3, 4, 5, 6]


def test_replace_keeps_the_checkpoints_and_only_fresh_starts_over(capsys, home, tmp_path, monkeypatch, checkpointing):
    assert cli(capsys, "submit", write_spec(tmp_path, **AR), "--wait")[0] == 0
    changed = write_spec(other_folder(tmp_path), optimizer={"lr": 1e-4}, **AR)
    code, _, err = cli(capsys, "submit", changed, "--replace", "--wait")
    assert code == 0, err
    assert "tiny-ar resumes from its checkpoint at step 6" in err
    assert lives(home) == [{"start": 0, "fresh": False}, {"start": 6, "fresh": False}], "--replace resumed"

    monkeypatch.setenv("FAKE_TRAINER_KILL_AT", "3")  # and a restart after the fresh start's first checkpoints
    code, _, err = cli(capsys, "submit", changed, "--fresh", "--wait")
    assert code == 0, err
    assert lives(home) == [{"start": 0, "fresh": True}, {"start": 2, "fresh": False}]
    assert trained_steps(home) == [1, 2, 3, 4, 5, 6]
    kept = list((experiment_dir(home) / "previous").iterdir())
    assert [p.name.split(".")[0] for p in kept] == ["tiny-ar"] and (kept[0] / "checkpoints").is_dir()
    assert f"tiny-ar starts over at step 0; its previous output is kept in {kept[0]}" in err


# ---- 5. damaged state -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_experiments(tmp_path_factory):
    """Two finished experiments, `good` and `broken`, made once; each test damages a copy of `broken`."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        home_dir = root / "home"
        patch.setenv("DLMCTL_HOME", str(home_dir))
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])))
        patch.setenv("DLMCTL_TRAINER_MODULE", "fake_trainer")
        patch.setenv("DLMCTL_LOCAL_LAUNCHER", "python")
        for name in ("good", "broken"):
            LocalBackend().submit(load_experiment(write_spec(root, name=name)))
        wait_for(lambda: {s.phase for s in LocalBackend().list()} == {"Succeeded"}, "both to finish")
    return home_dir / "experiments"


def _insert_line(path, number, text):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([*lines[:number - 1], text, *lines[number - 1:]]))


DAMAGE = {  # what happens to experiment `broken`, and the file it happens to
    "garbled supervisor.json": ("supervisor.json", lambda p: p.write_text('{"runs": ["broken-dlm", "broken-')),
    "truncated state.json": ("runs/broken-dlm/state.json", lambda p: p.write_text('{"phase": "Succeeded", "exit')),
    "state.json of another shape": ("runs/broken-ar/state.json", lambda p: p.write_text('["Succeeded"]')),
    "unknown phase in state.json": ("runs/broken-ar/state.json", lambda p: p.write_text('{"phase": "Done"}')),
    "garbled run.json": ("runs/broken-ar/run.json", lambda p: p.write_bytes(b"\x00\xff{")),
    "garbled experiment.yaml": ("experiment.yaml", lambda p: p.write_text("spec: [unclosed\n")),
    "invalid experiment.yaml": ("experiment.yaml", lambda p: p.write_text(p.read_text().replace("epochs: 2", "epochs: -2"))),
    "malformed metrics line": ("runs/broken-dlm/metrics.jsonl", lambda p: _insert_line(p, 2, '{"event": "train", "st\n')),
    "invalid metrics event": ("runs/broken-ar/metrics.jsonl", lambda p: _insert_line(p, 3, '{"event": "done", "step": "x"}\n')),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_state_file_is_named_and_never_breaks_or_passes_for_succeeded(capsys, home, finished_experiments, damage):
    shutil.copytree(finished_experiments, home / "experiments")
    relative, spoil = DAMAGE[damage]
    path = experiment_dir(home, "broken") / relative
    spoil(path)

    code, out, err = cli(capsys, "list", "-o", "json")
    assert code == 0, err
    assert {e["name"]: e["phase"] for e in json.loads(out)} == {"good": "Succeeded", "broken": "Unknown"}
    assert len(err.splitlines()) == 1 and err.startswith("warning: experiment 'broken': ") and str(path) in err
    code, out, _ = cli(capsys, "list")
    assert code == 0 and "good" in out and "broken" in out and "Unknown" in out

    code, out, err = cli(capsys, "get", "broken")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: experiment 'broken': ") and str(path) in err and "internal error" not in err
    assert cli(capsys, "get", "good")[0] == 0
    LocalBackend().cancel("broken")  # stopping works when reading does not


def test_each_fresh_submission_has_its_own_token_and_a_resubmission_keeps_it():
    """The trainer tells a fresh start's checkpoints apart by DLMCTL_FRESH: a second `--fresh` must not
    look like a restart of the first."""
    from dlmctl.cli.backends.local import _pending_state

    first, second = _pending_state(True)["fresh"], _pending_state(True)["fresh"]
    assert first and second and first != second
    assert _pending_state(False, keep=first)["fresh"] == first
    assert "fresh" not in _pending_state(False)


# ---- 6. following progress ------------------------------------------------------------------------


def metrics_lines(steps, base=5.0, time=1000.0):
    """metrics.jsonl lines of a run (the trainer's own writer): a start, then train, checkpoint and eval events."""
    from dlmctl.trainer.metrics import build_event, event_line

    lines = [event_line(build_event("start", time=time, step=0, total_steps=100, world_size=1, parameters=1000))]
    for step in steps:
        at = dict(step=step, total_steps=100, epoch=step / 100, tokens=step * 64)
        lines.append(event_line(build_event("train", time=time + step, train_loss=base / step, lr=1e-3, **at)))
        if step % 4 == 0:
            lines.append(event_line(build_event("checkpoint", time=time + step, step=step, epoch=step / 100,
                                                uri=f"store/step-{step}")))
            lines.append(event_line(build_event("eval", time=time + step, val_loss=base / step + 0.1, **at)))
    return [line.encode() for line in lines]


def folded_whole(path):
    """The reference: every event of the file's complete lines folded from scratch."""
    from dlmctl.spec.contracts import fold_progress, parse_event

    data = path.read_bytes()
    return fold_progress(e for e in (parse_event(json.loads(line)) for line in data[:data.rfind(b"\n") + 1].splitlines())
                         if e is not None)


class CountingOpen:
    """Stands in for `open` in local_state: counts the bytes read through the files it opens."""

    def __init__(self):
        self.bytes = 0

    def __call__(self, *args, **kwargs):
        f = open(*args, **kwargs)
        counter = self
        read = f.read

        def counted(*a):
            data = read(*a)
            counter.bytes += len(data)
            return data

        f.read = counted
        return f

    def take(self):
        count, self.bytes = self.bytes, 0
        return count


@pytest.fixture
def follower(monkeypatch):
    from dlmctl.cli.backends import local_state

    counting = CountingOpen()
    monkeypatch.setattr(local_state, "open", counting, raising=False)
    return local_state.ProgressFollower(), counting


def test_following_reads_only_the_appended_lines(tmp_path, follower):
    follow, opened = follower
    path = tmp_path / "metrics.jsonl"
    lines = metrics_lines(range(1, 101))
    path.write_bytes(b"".join(lines[:140]))
    assert follow.read(path) == folded_whole(path)
    assert opened.take() == path.stat().st_size, "the first read reads the file once"

    with open(path, "ab") as f:
        appended = b"".join(lines[140:143])
        f.write(appended + lines[143][:20])  # and the start of the next line, still being written
    assert follow.read(path) == folded_whole(path)
    checked = len(lines[0]) + len(lines[139])  # still the same file? its first line and the last one folded
    assert opened.take() <= checked + len(appended) + 20 < path.stat().st_size / 10

    with open(path, "ab") as f:
        f.write(lines[143][20:])
    assert follow.read(path) == folded_whole(path)
    assert opened.take() <= len(lines[0]) + len(lines[142]) + len(lines[143])
    assert follow.read(path) == folded_whole(path)
    assert opened.take() <= len(lines[0]) + len(lines[143]), "nothing new: only the check"


REWRITES = {
    # a resumed real trainer: the events up to its checkpoint, through os.replace (a new file)
    "replaced, cut back to the checkpoint": lambda path, kept, new: _replace(path, kept + new),
    # a resumed trainer writing in place: the same file, cut back (shorter than what was folded)
    "cut back in place": lambda path, kept, new: path.write_bytes(kept),
    # the same file, cut back and grown past the old end before the next read: the line before it changed
    "cut back in place and grown again": lambda path, kept, new: path.write_bytes(kept + new),
    # another run's file in its place: a different first line
    "rewritten from its first line": lambda path, kept, new: path.write_bytes(
        b"".join(metrics_lines(range(1, 120), base=9.0, time=5000.0))),
}


def _replace(path, data):
    tmp = path.with_name(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.mark.parametrize("rewrite", REWRITES)
def test_a_rewritten_file_is_folded_again_from_its_start(tmp_path, follower, rewrite):
    follow, opened = follower
    path = tmp_path / "metrics.jsonl"
    first = metrics_lines(range(1, 41))
    path.write_bytes(b"".join(first))
    before = follow.read(path)
    assert before.step == 40 and len(before.evals) == 10

    # the run resumes from its checkpoint at step 20: the events after it are dropped and logged again
    kept = b"".join(line for line in first if json.loads(line).get("step", 0) <= 20)
    again = b"".join(metrics_lines(range(21, 45), base=7.0, time=3000.0)[1:])
    REWRITES[rewrite](path, kept, again)
    after = follow.read(path)
    assert after == folded_whole(path), "the same as reading the whole file anew"
    assert after != before
    assert before.step == 40 and len(before.evals) == 10, "what was returned before is left alone"


def test_a_damaged_appended_line_is_named_by_its_line_number_every_time(tmp_path, follower):
    from dlmctl.cli.backends.local_state import CorruptState

    follow, _ = follower
    path = tmp_path / "metrics.jsonl"
    lines = metrics_lines(range(1, 9))
    path.write_bytes(b"".join(lines))
    assert follow.read(path, "tiny").step == 8
    with open(path, "ab") as f:
        f.write(b'{"event": "train", "st\n')
    for _ in range(2):
        with pytest.raises(CorruptState, match=f"line {len(lines) + 1} is not valid JSON"):
            follow.read(path, "tiny")
    assert follow.read(path).step == 8, "read tolerantly, the damaged line is skipped"


def test_get_wait_follows_each_runs_metrics_without_reading_them_again(capsys, home, finished_experiments, follower):
    from dlmctl.trainer.metrics import build_event, event_line

    _, opened = follower
    shutil.copytree(finished_experiments, home / "experiments")
    backend = LocalBackend()  # `get --wait` asks the same backend every second
    metrics = {run: run_dir(home, "good", run) / "metrics.jsonl" for run in ("good-dlm", "good-ar")}
    assert [r.step for r in backend.get("good").status.runs] == [4, 4]
    assert opened.take() == sum(p.stat().st_size for p in metrics.values())

    checked = sum(len(lines[0]) + len(lines[-1]) for lines in (p.read_bytes().splitlines(True) for p in metrics.values()))
    line = event_line(build_event("train", step=5, total_steps=5, epoch=2.0, tokens=5 * 8 * 64, train_loss=0.5)).encode()
    with open(metrics["good-ar"], "ab") as f:
        f.write(line)
    assert [(r.step, r.train_loss) for r in backend.get("good").status.runs] == [(4, 1.25), (5, 0.5)]
    assert opened.take() <= checked + len(line) < sum(p.stat().st_size for p in metrics.values()) / 2


def test_relative_data_paths_are_stored_absolute_so_trainers_in_their_own_folders_find_them(tmp_path, monkeypatch):
    from dlmctl.spec import absolute_local_paths, experiment_from_dict

    (tmp_path / "corpus").mkdir()
    monkeypatch.chdir(tmp_path)
    experiment = experiment_from_dict({"metadata": {"name": "rel"}, "spec": {
        "data": {"train": "./corpus/train.txt", "validation": "../elsewhere/valid.txt", "cache": "s3://bucket/cache"},
        "checkpoint": {"uri": "file://ckpt"}, "sweep": {"data.tokenizer.path": [None]}}})
    fixed = absolute_local_paths(experiment).spec
    assert fixed.data.train == str(tmp_path / "corpus" / "train.txt")
    assert fixed.data.validation == str(tmp_path.parent / "elsewhere" / "valid.txt")
    assert (fixed.data.cache, fixed.checkpoint.uri) == ("s3://bucket/cache", f"file://{tmp_path / 'ckpt'}")
    assert absolute_local_paths(experiment, cwd=tmp_path).spec == fixed
    assert [r.name for r in absolute_local_paths(experiment).runs()] == [r.name for r in experiment.runs()]
