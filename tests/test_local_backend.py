"""The local backend end to end: a detached supervisor runs each run as a subprocess; state, logs and
metrics live under $DLMCTL_HOME. The trainer here is tests/fake_trainer.py (the contract without torch)."""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from dlmctl.cli.app import main
from dlmctl.cli.backends import get_backend
from dlmctl.cli.backends.local import LocalBackend
from dlmctl.cli.backends.local_state import pid_alive
from dlmctl.cli.errors import NotFound, UserError
from dlmctl.spec import Run, load_experiment
from dlmctl.spec.contracts import is_terminal

TESTS = Path(__file__).resolve().parent
TIMEOUT = 60


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("DLMCTL_HOME", str(path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("DLMCTL_TRAINER_MODULE", "fake_trainer")
    monkeypatch.setenv("DLMCTL_LOCAL_LAUNCHER", "python")
    monkeypatch.setenv("DLMCTL_WATCH_INTERVAL", "0.1")
    monkeypatch.setenv("DLMCTL_CANCEL_GRACE", "2")
    monkeypatch.setenv("DLMCTL_RESTART_BACKOFF", "0.1")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    for knob in ("DLMCTL_BACKEND", "DLMCTL_LOCAL_PARALLEL", "KUBERNETES_SERVICE_HOST", "DLMCTL_FRESH", "FAKE_TRAINER_FAIL",
                 "FAKE_TRAINER_HANG", "FAKE_TRAINER_FAIL_CODE", "FAKE_TRAINER_CHECKPOINTS", "FAKE_TRAINER_KILL_AT",
                 "FAKE_TRAINER_KILL_LIVES", "FAKE_TRAINER_SLEEP", "FAKE_TRAINER_STEPS"):
        monkeypatch.delenv(knob, raising=False)
    yield path
    backend = LocalBackend()
    for summary in backend.list():  # never leave a supervisor behind
        if not is_terminal(summary.phase):
            backend.cancel(summary.name)


def write_spec(tmp_path, name="tiny", **spec) -> Path:
    document = {
        "apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name},
        "spec": {"model": {"preset": "nano"}, "data": {"unique_tokens": 4096, "seq_len": 64, "epochs": 2},
                 "batch": {"global_sequences": 8, "micro_batch_sequences": 8}, "metrics": {"port": 0}, **spec},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def other_folder(tmp_path) -> Path:
    """For a second spec of the same name beside the first."""
    folder = tmp_path / "other"
    folder.mkdir(exist_ok=True)
    return folder


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def wait_for(predicate, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def run_dir(home: Path, experiment: str, run: str) -> Path:
    return home / "experiments" / experiment / "runs" / run


def test_submit_wait_trains_every_run_and_prints_the_comparison(capsys, home, tmp_path):
    code, out, err = cli(capsys, "submit", write_spec(tmp_path), "--wait")
    assert code == 0, err
    assert "tiny-dlm" in out and "Succeeded  step 4/4" in out, "a progress line per step"
    table = out[out.index("tiny: DLM vs AR"):]
    for column in ("arm", "train loss", "val loss", "tokens seen", "epochs", "wall time"):
        assert column in table
    assert "│ tiny-dlm │ diffusion      │ Succeeded │      1.250 │    1.350 │" in table

    exp = home / "experiments" / "tiny"
    assert load_experiment(exp / "experiment.yaml").metadata.name == "tiny"
    for run in load_experiment(exp / "experiment.yaml").runs():
        folder = run_dir(home, "tiny", run.name)
        assert Run.model_validate_json((folder / "run.json").read_text()) == run
        state = json.loads((folder / "state.json").read_text())
        assert (state["phase"], state["exit_code"]) == ("Succeeded", 0)
        assert state["start_time"] <= state["end_time"]
        assert "fake trainer: done" in (folder / "train.log").read_text()
        assert [json.loads(line)["event"] for line in (folder / "metrics.jsonl").read_text().splitlines()][-2:] == ["eval", "done"]


def test_the_trainer_gets_the_run_in_its_environment_and_its_run_folder_as_output(capsys, home, tmp_path):
    assert cli(capsys, "submit", write_spec(tmp_path), "--wait")[0] == 0
    seen = json.loads((run_dir(home, "tiny", "tiny-ar") / "fake_env.json").read_text())
    assert seen["argv"] == ["--output", str(run_dir(home, "tiny", "tiny-ar"))]
    assert (seen["env"]["RANK"], seen["env"]["WORLD_SIZE"]) == ("0", "1")


def test_by_default_runs_are_launched_by_torchrun(capsys, home, tmp_path, monkeypatch):
    monkeypatch.delenv("DLMCTL_LOCAL_LAUNCHER")
    assert cli(capsys, "submit", write_spec(tmp_path, arms=["autoregressive"]), "--wait")[0] == 0
    folder = run_dir(home, "tiny", "tiny-ar")
    assert "-m torch.distributed.run --standalone --nproc-per-node=1 -m fake_trainer" in (folder / "train.log").read_text()
    seen = json.loads((folder / "fake_env.json").read_text())["env"]
    assert (seen["RANK"], seen["WORLD_SIZE"], seen["MASTER_ADDR"]) == ("0", "1", "localhost")


def test_a_failed_run_fails_the_experiment_but_not_the_other_runs(capsys, home, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_FAIL", "diffusion")
    code, out, err = cli(capsys, "submit", write_spec(tmp_path, scheduling={"max_restarts": 0}), "--wait")
    assert code == 1
    assert "experiment tiny failed: 1/2 runs succeeded" in err
    status = LocalBackend().get("tiny").status
    assert [(r.name, r.phase) for r in status.runs] == [("tiny-dlm", "Failed"), ("tiny-ar", "Succeeded")]
    assert status.runs[0].message == "trainer exited with code 3; see `dlmctl logs tiny --run tiny-dlm`"
    assert (status.phase, status.progress) == ("Failed", "1/2")


def test_cancel_stops_the_running_run_and_the_pending_ones(capsys, home, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_HANG", "diffusion")
    assert cli(capsys, "submit", write_spec(tmp_path))[0] == 0
    backend = LocalBackend()
    wait_for(lambda: (run_dir(home, "tiny", "tiny-dlm") / "fake_env.json").exists(), "the first run to start")
    trainer_pid = json.loads((run_dir(home, "tiny", "tiny-dlm") / "state.json").read_text())["pid"]
    assert backend.get("tiny").status.phase == "Running"

    code, out, _ = cli(capsys, "cancel", "tiny")
    assert (code, out.strip()) == (0, "experiment tiny cancelled")
    status = backend.get("tiny").status
    assert [(r.phase, r.message) for r in status.runs] == [("Cancelled", "cancelled"), ("Cancelled", "cancelled before it started")]
    assert status.phase == "Cancelled"
    assert not pid_alive(trainer_pid)
    assert cli(capsys, "cancel", "tiny")[1].strip() == "experiment tiny already finished (Cancelled)"


def test_a_dead_supervisor_fails_the_unfinished_runs(capsys, home, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_HANG", "diffusion")
    assert cli(capsys, "submit", write_spec(tmp_path))[0] == 0
    wait_for(lambda: (run_dir(home, "tiny", "tiny-dlm") / "fake_env.json").exists(), "the first run to start")
    supervisor = json.loads((home / "experiments" / "tiny" / "supervisor.json").read_text())
    os.killpg(supervisor["pgid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(supervisor["pid"]), "the supervisor to die")
    status = LocalBackend().get("tiny").status
    assert {r.phase for r in status.runs} == {"Failed"}
    assert status.runs[0].message.startswith("the local supervisor exited before this run finished")


def test_runs_can_run_in_parallel(capsys, home, tmp_path, monkeypatch):
    monkeypatch.setenv("DLMCTL_LOCAL_PARALLEL", "2")
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0.3")
    assert cli(capsys, "submit", write_spec(tmp_path), "--wait")[0] == 0
    dlm, ar = LocalBackend().get("tiny").status.runs
    assert ar.startTime < dlm.completionTime and dlm.startTime < ar.completionTime


def test_logs_of_one_run_or_of_all_runs_prefixed(capsys, home, tmp_path):
    assert cli(capsys, "submit", write_spec(tmp_path), "--wait")[0] == 0
    code, out, _ = cli(capsys, "logs", "tiny", "--run", "tiny-ar")
    assert code == 0 and "step 4/4 loss 1.125" in out and "[tiny-ar]" not in out
    code, out, _ = cli(capsys, "logs", "tiny")
    assert "[tiny-dlm] fake trainer: done" in out and "[tiny-ar] fake trainer: done" in out
    code, _, err = cli(capsys, "logs", "tiny", "--run", "tiny-xl")
    assert code == 2 and "experiment 'tiny' has no run 'tiny-xl' (its runs: tiny-dlm, tiny-ar)" in err


def test_logs_follow_streams_until_the_runs_finish(capsys, home, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_SLEEP", "0.1")
    assert cli(capsys, "submit", write_spec(tmp_path))[0] == 0
    code, out, _ = cli(capsys, "logs", "tiny", "-f")
    assert code == 0
    assert out.rstrip().endswith("[tiny-ar] fake trainer: done")
    assert LocalBackend().get("tiny").status.phase == "Succeeded"


def test_list_get_and_compare(capsys, home, tmp_path):
    assert cli(capsys, "submit", write_spec(tmp_path), "--wait")[0] == 0
    code, out, _ = cli(capsys, "list")
    assert code == 0 and "tiny" in out and "Succeeded" in out and "2/2" in out
    listed = json.loads(cli(capsys, "list", "-o", "json")[1])
    assert [(e["name"], e["phase"], e["runs"], e["succeeded"]) for e in listed] == [("tiny", "Succeeded", 2, 2)]
    got = json.loads(cli(capsys, "get", "tiny", "-o", "json")[1])
    assert got["status"]["phase"] == "Succeeded"
    assert [r["val_loss"] for r in got["status"]["runs"]] == [pytest.approx(1.35), pytest.approx(1.225)]
    assert [(r["step"], r["train_loss"]) for r in got["status"]["runs"]] == [(4, 1.25), (4, 1.125)]
    assert got["status"]["runs"][0]["last_checkpoint"].endswith("tiny-dlm/checkpoints/step-00000004")
    assert yaml.safe_load(cli(capsys, "get", "tiny", "-o", "yaml")[1]) == got
    assert "4/4" in cli(capsys, "get", "tiny")[1]
    compared = cli(capsys, "compare", "tiny")[1]
    assert "tokens seen" in compared
    # one evaluation per run, at the end (the fake trainer's): AR's 1.225 is better than the DLM's 1.350
    row = next(line for line in compared.splitlines() if "1.350" in line and "1.225" in line)
    assert row.replace("│", " ").split()[-1] == "none", compared


def test_an_existing_experiment_is_only_replaced_on_request(capsys, home, tmp_path):
    spec = write_spec(tmp_path)
    assert cli(capsys, "submit", spec, "--wait")[0] == 0
    first = (home / "experiments" / "tiny" / "supervisor.json").read_text()
    code, _, err = cli(capsys, "submit", write_spec(other_folder(tmp_path), arms=["diffusion"]))
    assert code == 2 and "experiment 'tiny' already exists (Succeeded) with a different spec; pass --replace" in err
    code, _, err = cli(capsys, "submit", spec)
    assert code == 0 and "experiment tiny already succeeded with this spec; nothing to do" in err, "idempotent"
    assert (home / "experiments" / "tiny" / "supervisor.json").read_text() == first
    assert cli(capsys, "submit", spec, "--replace", "--wait")[0] == 0
    assert (home / "experiments" / "tiny" / "supervisor.json").read_text() != first
    assert sorted(p.name for p in (home / "experiments").iterdir()) == ["tiny"], "no staging or replaced folders left"


def test_replacing_a_running_experiment_cancels_it_first(capsys, home, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER_HANG", "diffusion")
    spec = write_spec(tmp_path)
    assert cli(capsys, "submit", spec)[0] == 0
    wait_for(lambda: (run_dir(home, "tiny", "tiny-dlm") / "fake_env.json").exists(), "the first run to start")
    old_pid = json.loads((run_dir(home, "tiny", "tiny-dlm") / "state.json").read_text())["pid"]
    monkeypatch.delenv("FAKE_TRAINER_HANG")
    assert cli(capsys, "submit", spec, "--replace", "--wait")[0] == 0
    assert not pid_alive(old_pid)


def test_the_backend_interface_directly(home, tmp_path):
    backend = get_backend()
    assert isinstance(backend, LocalBackend), "local is the default without a cluster context"
    experiment = load_experiment(write_spec(tmp_path))
    assert backend.submit(experiment) == ["tiny-dlm", "tiny-ar"]
    wait_for(lambda: backend.get("tiny").status.phase == "Succeeded", "the experiment to finish")
    assert [s.name for s in backend.list()] == ["tiny"]
    assert backend.artifacts("tiny-ar") == str(run_dir(home, "tiny", "tiny-ar"))
    assert list(backend.logs("tiny", run="tiny-ar"))[-1] == "fake trainer: done"
    with pytest.raises(NotFound):
        backend.get("other")
    assert backend.submit(experiment) == ["tiny-dlm", "tiny-ar"], "the same spec again: nothing to do"
    with pytest.raises(UserError, match="with a different spec"):
        backend.submit(load_experiment(write_spec(other_folder(tmp_path), arms=["diffusion"])))


def test_nothing_is_written_before_a_submit_is_known_to_be_good(home, tmp_path):
    experiment = load_experiment(write_spec(tmp_path, resources={"nodes": 2}, batch={"global_sequences": 16, "micro_batch_sequences": 8}))
    with pytest.raises(UserError, match="nodes must be 1"):
        LocalBackend().submit(experiment)
    assert not home.exists()
    assert LocalBackend().list() == [] and not home.exists(), "reading creates nothing either"
