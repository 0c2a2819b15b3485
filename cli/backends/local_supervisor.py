"""The detached process that executes a local experiment's runs, one after another (or N at once).

    python -m dlmctl.cli.backends.local_supervisor <experiment dir> [--detach]

Each run is a real subprocess,
    python -m torch.distributed.run --standalone --nproc-per-node=<P> -m <trainer> --output <run dir>
with the Run in $DLMCTL_RUN_SPEC (as on a cluster; `--run` cannot pass through torchrun, whose
parser takes it for an abbreviation of its own --run-path). stdout and stderr go to train.log;
state.json follows Pending -> Running -> Succeeded | Failed | Cancelled.

Environment: DLMCTL_LOCAL_PARALLEL (runs at once, default 1), DLMCTL_TRAINER_MODULE (default
dlmctl.trainer), DLMCTL_LOCAL_LAUNCHER (torchrun, the default, or python: the trainer module
directly with single-process RANK/WORLD_SIZE, for tests), DLMCTL_CANCEL_GRACE (seconds, default 10).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from dlmctl.spec.contracts import RUN_SPEC_ENV, RunPhase

from .local_state import ExperimentDir, descendants, kill_all, now, read_json, write_json

POLL_SECONDS = 0.2


def grace_seconds() -> float:
    return float(os.environ.get("DLMCTL_CANCEL_GRACE", "10"))


def trainer_command(run_json: Path, output: Path) -> list[str]:
    run = json.loads(run_json.read_text())
    res = run["spec"]["resources"]
    procs = res.get("processes_per_node") or res.get("gpus_per_node") or 1
    module = os.environ.get("DLMCTL_TRAINER_MODULE") or "dlmctl.trainer"
    trainer = ["-m", module, "--output", str(output)]
    if os.environ.get("DLMCTL_LOCAL_LAUNCHER", "torchrun") == "python":
        return [sys.executable, *trainer]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *trainer]


def trainer_env(run_json: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[RUN_SPEC_ENV] = run_json.read_text()
    if os.environ.get("DLMCTL_LOCAL_LAUNCHER") == "python":
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    return env


class Supervisor:
    def __init__(self, exp: ExperimentDir):
        self.exp = exp
        self.parallel = max(1, int(os.environ.get("DLMCTL_LOCAL_PARALLEL", "1")))
        self.running: dict[str, subprocess.Popen] = {}
        self.cancelled = False

    def on_signal(self, signum, frame) -> None:
        self.cancelled = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        pending = [r for r in self.exp.run_names() if not self.exp.finished(r)]
        while (pending or self.running) and not self.cancelled:
            while pending and len(self.running) < self.parallel and not self.cancelled:
                self.start(pending.pop(0))
            self.reap()
            time.sleep(POLL_SECONDS)
        if self.cancelled:
            self.stop_all()
            for run in pending:
                self.exp.set_state(run, phase=RunPhase.Cancelled.value, end_time=now(),
                                   message="cancelled before it started")
        return 0

    def start(self, run: str) -> None:
        run_dir = self.exp.run_dir(run)
        try:
            cmd = trainer_command(self.exp.run_json(run), run_dir)
            with open(self.exp.train_log(run), "ab") as log:
                log.write(f"$ {' '.join(cmd)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir,
                    env=trainer_env(self.exp.run_json(run)),
                )
        except (OSError, ValueError, KeyError) as err:
            self.exp.set_state(run, phase=RunPhase.Failed.value, start_time=now(), end_time=now(),
                               message=f"could not start: {err}")
            return
        self.running[run] = proc
        self.exp.set_state(run, phase=RunPhase.Running.value, pid=proc.pid, start_time=now(), command=cmd)

    def reap(self) -> None:
        for run, proc in list(self.running.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.running[run]
            if code == 0:
                self.exp.set_state(run, phase=RunPhase.Succeeded.value, exit_code=0, end_time=now())
            elif self.cancelled:  # the cancel signal reached the trainer first
                self.exp.set_state(run, phase=RunPhase.Cancelled.value, exit_code=code, end_time=now(),
                                   message="cancelled")
            else:
                self.exp.set_state(run, phase=RunPhase.Failed.value, exit_code=code, end_time=now(),
                                   message=f"trainer exited with code {code}; see `dlmctl logs {self.exp.name} --run {run}`")

    def stop_all(self) -> None:
        """SIGTERM each run (torchrun stops its workers), SIGKILL whatever is left after the grace period."""
        trees = {run: descendants(proc.pid) for run, proc in self.running.items()}
        for proc in self.running.values():
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds()
        while time.monotonic() < deadline and any(p.poll() is None for p in self.running.values()):
            time.sleep(POLL_SECONDS)
        for run, proc in self.running.items():
            kill_all({**trees[run], **descendants(proc.pid)}, signal.SIGKILL)
            if proc.poll() is None:
                _signal(proc, signal.SIGKILL)
            proc.wait()
            self.exp.set_state(run, phase=RunPhase.Cancelled.value, exit_code=proc.returncode, end_time=now(),
                               message="cancelled")
        self.running.clear()


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


def detach(exp: ExperimentDir) -> Optional[int]:
    """Fork: the parent records the child's pid and process group and returns; the child supervises.

    The CLI that started us waits only for the parent, so the supervisor is never its zombie.
    """
    pid = os.fork()
    if pid:
        info = read_json(exp.supervisor_json, {})
        write_json(exp.supervisor_json, {**info, "pid": pid, "pgid": os.getpgrp(), "start_time": now()})
        return pid
    return None


def main(argv: list[str]) -> int:
    exp = ExperimentDir(Path(argv[0]))
    if "--detach" in argv[1:] and detach(exp):
        os._exit(0)
    return Supervisor(exp).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
