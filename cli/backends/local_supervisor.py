"""The detached process that executes a local experiment's runs, one after another (or N at once),
restarting a run that fails up to its spec.scheduling.max_restarts.

    python -m dlmctl.cli.backends.local_supervisor <experiment dir> [--detach]

Each run is a real subprocess,
    python -m torch.distributed.run --standalone --nproc-per-node=<P> -m <trainer> --output <run dir>
with the Run in $DLMCTL_RUN_SPEC (as on a cluster; `--run` cannot pass through torchrun, whose
parser takes it for an abbreviation of its own --run-path). stdout and stderr go to train.log;
state.json follows Pending -> Running [-> Restarting -> Running ...] -> Succeeded | Failed | Cancelled.
A trainer that exits with code 2 (a mistake in the spec) is never restarted; any other failure is,
after a backoff, and the trainer resumes from its newest verified checkpoint. A run submitted with
`--fresh` gets DLMCTL_FRESH=<this submission's token> (ignore existing checkpoints) until it has written a checkpoint of its own.

One supervisor per experiment (it holds supervisor.lock). With it runs its watchdog,
    python -m dlmctl.cli.backends.local_supervisor <experiment dir> --watchdog <generation>
in a session of its own, reading a pipe only the supervisor writes to: when the supervisor dies,
however it dies (kill -9 included), the watchdog stops every process of its runs (found by the
markers in their environment, wherever they are in the process tree) and marks the unfinished runs
Failed, so no trainer outlives its supervisor.

Environment: DLMCTL_LOCAL_PARALLEL (runs at once, default 1), DLMCTL_TRAINER_MODULE (default
dlmctl.trainer), DLMCTL_LOCAL_LAUNCHER (torchrun, the default, or python: the trainer module
directly with single-process RANK/WORLD_SIZE, for tests), DLMCTL_CANCEL_GRACE (seconds, default 10),
DLMCTL_RESTART_BACKOFF (seconds before the first restart, default 10; doubling, at most 300).

CPU threads: each trainer process gets OMP_NUM_THREADS = MKL_NUM_THREADS = the CPUs this machine gives
us (affinity, capped by a cgroup CPU quota) shared among the runs running at once and their processes,
and OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin-wait on busy cores burn several times the CPU of
the work itself. A user's own OMP_NUM_THREADS (or OMP_WAIT_POLICY) is kept.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dlmctl.spec.contracts import RUN_SPEC_ENV, RunPhase
from dlmctl.spec.settings import FRESH_ENV, ClientSettings, read

from .local_state import (
    EXPERIMENT_ENV,
    GENERATION_ENV,
    MARKERS,
    RUN_ENV,
    ExperimentDir,
    LockBusy,
    descendants,
    experiment_lock,
    experiment_processes,
    held_lock,
    identity,
    newest_checkpoint_step,
    now,
    read_json,
    terminate,
    write_json,
)

MODULE = "dlmctl.cli.backends.local_supervisor"
POLL_SECONDS = 0.2
USER_ERROR_EXIT = 2  # the trainer's exit code for a mistake in the spec (dlmctl.trainer.__main__)
MAX_BACKOFF_SECONDS = 300.0
SUPERVISOR_LOST = ("the local supervisor exited before this run finished; its processes were stopped -- "
                   "submit the same spec again to resume from the newest checkpoint")
# torchrun exits 1 whatever its worker's code was; its failure report names the worker's.
TORCHRUN_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?exitcode\s*:\s*(-?\d+)", re.S)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def grace_seconds() -> float:
    return read(ClientSettings).cancel_grace


def restart_backoff(restarts: int) -> float:
    """Seconds to wait before the (restarts+1)-th restart."""
    base = read(ClientSettings).restart_backoff
    return min(base * 2 ** restarts, MAX_BACKOFF_SECONDS)


def launcher() -> str:
    return read(ClientSettings).local_launcher


def processes_per_node(run_json: Path) -> int:
    res = json.loads(run_json.read_text())["spec"]["resources"]
    return res.get("processes_per_node") or res.get("gpus_per_node") or 1


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> Optional[float]:
    """The CPUs a cgroup CPU quota lets this process use (the tightest along its cgroup's path; v2 cpu.max,
    v1 cpu.cfs_quota_us / cpu.cfs_period_us), or None without a quota."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    limits = []
    for _, controllers, path in (line.split(":", 2) for line in lines if line.count(":") >= 2):
        if controllers == "":
            base, read = root, _cpu_max
        elif "cpu" in controllers.split(","):
            base, read = root / controllers, _cfs_quota
        else:
            continue
        folder = base / path.lstrip("/")  # absent in a container that sees its own cgroup as the root
        for level in [folder, *folder.parents]:
            if level == base or base in level.parents:
                limits.append(read(level))
    found = [limit for limit in limits if limit]
    return min(found) if found else None


def _cpu_max(folder: Path) -> Optional[float]:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cfs_quota(folder: Path) -> Optional[float]:
    try:
        quota, period = (int((folder / f"cpu.cfs_{name}_us").read_text()) for name in ("quota", "period"))
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        import psutil

        cpus = psutil.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cpus, int(quota)) if quota else cpus)


def threads_per_process(cpus: int, runs_at_once: int, procs: int) -> int:
    return max(1, cpus // (max(1, runs_at_once) * max(1, procs)))


def thread_env(threads: int, environ: dict[str, str]) -> dict[str, str]:
    """The thread settings a trainer's environment lacks: a user's OMP_NUM_THREADS wins (MKL follows it)."""
    env = {} if "OMP_NUM_THREADS" in environ else {"OMP_NUM_THREADS": str(threads)}
    if env and "MKL_NUM_THREADS" not in environ:
        env["MKL_NUM_THREADS"] = str(threads)
    if "OMP_WAIT_POLICY" not in environ:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def trainer_command(run_json: Path, output: Path) -> list[str]:
    procs = processes_per_node(run_json)
    module = read(ClientSettings).trainer_module
    trainer = ["-m", module, "--output", str(output)]
    if launcher() == "python":
        return [sys.executable, *trainer]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *trainer]


def trainer_env(run_json: Path, exp: Optional[ExperimentDir] = None, run: str = "", generation: str = "",
                fresh: Optional[str] = None, runs_at_once: int = 1) -> dict[str, str]:
    """The trainer's environment: the Run, the markers that find its processes later, DLMCTL_FRESH, and
    its CPU threads (this machine's CPUs shared by `runs_at_once` runs and their processes)."""
    env = {k: v for k, v in os.environ.items() if k not in (*MARKERS, FRESH_ENV)}
    env.update(PYTHONUNBUFFERED="1")
    env.update(thread_env(threads_per_process(available_cpus(), runs_at_once, processes_per_node(run_json)), env))
    env[RUN_SPEC_ENV] = run_json.read_text()
    if exp is not None:
        env.update({EXPERIMENT_ENV: exp.key, RUN_ENV: run, GENERATION_ENV: generation})
    if fresh:
        env[FRESH_ENV] = fresh  # this submission's token: see local._pending_state
    if launcher() == "python":
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    return env


@dataclass
class Life:
    """One start of a run's trainer."""

    proc: subprocess.Popen
    log: Path  # train.log
    log_offset: int  # where this life's output starts in it


class Supervisor:
    def __init__(self, exp: ExperimentDir):
        self.exp = exp
        self.generation = str(exp.supervisor().get("generation") or "")
        self.parallel = read(ClientSettings).local_parallel
        self.pending: list[str] = []
        self.running: dict[str, Life] = {}
        self.waiting: dict[str, float] = {}  # run -> when it restarts (time.monotonic)
        self.cancelled = False

    def on_signal(self, signum, frame) -> None:
        self.cancelled = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        pending = self.pending = [r for r in self.exp.run_names() if not self.exp.finished(r)]
        try:
            while (pending or self.running or self.waiting) and not self.cancelled:
                for run, due in list(self.waiting.items()):
                    if due <= time.monotonic() and not self.cancelled:
                        del self.waiting[run]
                        self.start(run)
                while pending and len(self.running) + len(self.waiting) < self.parallel and not self.cancelled:
                    self.start(pending.pop(0))
                self.reap()
                time.sleep(POLL_SECONDS)
        except Exception as err:  # a bug here must not leave trainers behind, nor runs that look alive
            traceback.print_exc()
            self.stop_all(RunPhase.Failed, f"the local supervisor failed ({type(err).__name__}: {err}); "
                                           f"see {self.exp.supervisor_log}")
            for run in [*pending, *self.waiting]:
                self.exp.set_state(run, phase=RunPhase.Failed.value, end_time=now(), reason="SupervisorFailed",
                                   message=f"the local supervisor failed before this run finished; see {self.exp.supervisor_log}")
            return 1
        if self.cancelled:
            self.stop_all()
            for run in pending:
                self.exp.set_state(run, phase=RunPhase.Cancelled.value, end_time=now(),
                                   message="cancelled before it started")
            for run in self.waiting:
                self.exp.set_state(run, phase=RunPhase.Cancelled.value, end_time=now(),
                                   message="cancelled while waiting to restart")
        return 0

    def start(self, run: str) -> None:
        run_dir = self.exp.run_dir(run)
        state = self.exp.state(run)
        # A fresh start until the run has a checkpoint of its own: until then, a restart starts over too.
        token = state.get("fresh")
        fresh = str(token) if token and newest_checkpoint_step(self.exp.metrics(run)) is None else None
        try:
            cmd = trainer_command(self.exp.run_json(run), run_dir)
            # this run, those running or waiting to restart, and those still to start share the CPUs
            runs_at_once = min(self.parallel, 1 + len(self.running) + len(self.waiting) + len(self.pending))
            env = trainer_env(self.exp.run_json(run), self.exp, run, self.generation, fresh, runs_at_once)
            with open(self.exp.train_log(run), "ab") as log:
                offset = log.tell()
                log.write(f"$ {f'{FRESH_ENV}={fresh} ' if fresh else ''}{' '.join(cmd)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir, env=env,
                )
        except (OSError, ValueError, KeyError, TypeError) as err:
            self.exp.set_state(run, phase=RunPhase.Failed.value, start_time=state.get("start_time") or now(),
                               end_time=now(), reason="StartFailed", message=f"could not start: {err}")
            return
        self.running[run] = Life(proc, self.exp.train_log(run), offset)
        self.exp.set_state(run, phase=RunPhase.Running.value, **identity(proc.pid), command=cmd,
                           start_time=state.get("start_time") or now(), reason=None, message=None)

    def reap(self) -> None:
        for run, life in list(self.running.items()):
            code = life.proc.poll()
            if code is None:
                continue
            del self.running[run]
            self.sweep(run)
            if code == 0:
                self.exp.set_state(run, phase=RunPhase.Succeeded.value, exit_code=0, end_time=now(),
                                   reason=None, message=None)
            elif self.cancelled:  # the cancel signal reached the trainer first
                self.exp.set_state(run, phase=RunPhase.Cancelled.value, exit_code=code, end_time=now(),
                                   message="cancelled")
            else:
                self.failed(run, code, life)

    def sweep(self, run: str) -> None:
        """Stop what a run's trainer left behind (the workers of a killed torchrun): a restart must
        never train beside them."""
        leftovers = experiment_processes(self.exp.key, run=run, generation=self.generation)
        if leftovers:
            print(f"{run}: stopping {len(leftovers)} leftover processes ({', '.join(str(p.pid) for p in leftovers)})",
                  file=sys.stderr, flush=True)
            terminate(leftovers, grace_seconds())

    def failed(self, run: str, code: int, life: Life) -> None:
        worker = self.worker_exit_code(code, life)
        what = describe_exit(code, worker)
        state = self.exp.state(run)
        restarts = state.get("restarts") if isinstance(state.get("restarts"), int) else 0
        limit = self.max_restarts(run)
        logs = f"see `dlmctl logs {self.exp.name} --run {run}`"
        if worker == USER_ERROR_EXIT:
            self.exp.set_state(run, phase=RunPhase.Failed.value, exit_code=code, end_time=now(), reason="UserError",
                               message=f"{what}: a mistake in the spec or its data, which a restart would repeat; {logs}")
        elif restarts >= limit:
            after = f" after {restarts} restarts (spec.scheduling.max_restarts: {limit})" if limit else ""
            self.exp.set_state(run, phase=RunPhase.Failed.value, exit_code=code, end_time=now(),
                               reason="TrainerFailed", message=f"{what}{after}; {logs}")
        else:
            delay = restart_backoff(restarts)
            step = newest_checkpoint_step(self.exp.metrics(run))
            resume = f"from its checkpoint at step {step}" if step is not None else "from step 0 (no checkpoint yet)"
            self.waiting[run] = time.monotonic() + delay
            self.exp.set_state(run, phase=RunPhase.Restarting.value, exit_code=code, restarts=restarts + 1,
                               reason="TrainerFailed",
                               message=f"{what}; restart {restarts + 1} of {limit} in {delay:g}s, resuming {resume}")

    def worker_exit_code(self, code: int, life: Life) -> int:
        """The trainer's own exit code: torchrun exits 1 whatever its worker's was, and names the worker's
        in the failure report it writes to train.log."""
        if code != 1 or launcher() == "python":
            return code
        try:
            with open(life.log, "rb") as log:
                log.seek(life.log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError:
            return code
        found = TORCHRUN_ROOT_CAUSE.findall(text)
        return int(found[-1]) if found else code

    def max_restarts(self, run: str) -> int:
        spec = read_json(self.exp.run_json(run), {}).get("spec")
        value = spec.get("scheduling", {}).get("max_restarts", 3) if isinstance(spec, dict) else 3
        return value if isinstance(value, int) and value >= 0 else 3

    def stop_all(self, phase: RunPhase = RunPhase.Cancelled, message: str = "cancelled") -> None:
        """SIGTERM each run (torchrun stops its workers; the trainer checkpoints), SIGKILL whatever is left
        after the grace period, then anything else of this submission still running."""
        trees = {run: descendants(life.proc.pid) for run, life in self.running.items()}
        for life in self.running.values():
            _signal(life.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds()
        while time.monotonic() < deadline and any(life.proc.poll() is None for life in self.running.values()):
            time.sleep(POLL_SECONDS)
        for run, life in self.running.items():
            for pid, started in {**trees[run], **descendants(life.proc.pid)}.items():
                _kill_if_same(pid, started)
            if life.proc.poll() is None:
                _signal(life.proc, signal.SIGKILL)
            life.proc.wait()
            self.exp.set_state(run, phase=phase.value, exit_code=life.proc.returncode, end_time=now(), message=message)
        self.running.clear()
        terminate(experiment_processes(self.exp.key, generation=self.generation), 1.0)


def describe_exit(code: int, worker: int) -> str:
    if worker < 0:
        try:
            return f"trainer killed by {signal.Signals(-worker).name}"
        except ValueError:
            return f"trainer killed by signal {-worker}"
    return f"trainer exited with code {worker}"


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


def _kill_if_same(pid: int, started: str) -> None:
    """SIGKILL a process seen earlier (pid and start tick, as `descendants` gives them), never a reused pid."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19] == started:
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):
        pass


# ---- the process itself: detach, hold the experiment, run its watchdog ------------------------------


def serve(exp: ExperimentDir, ready_fd: Optional[int] = None) -> int:
    """Supervise `exp`: hold its supervisor.lock, start the watchdog, record who we are (then tell the
    process that started us, through `ready_fd`), run the runs, and tell the watchdog we are done."""
    try:
        with held_lock(exp.supervisor_lock, "the supervisor"):
            info = exp.supervisor()
            generation = str(info.get("generation") or "")
            done_fd, watchdog = start_watchdog(exp, generation)
            write_json(exp.supervisor_json, {**info, **identity(os.getpid()), "pgid": os.getpgrp(), "start_time": now(),
                                             "watchdog": identity(watchdog.pid)})
            if ready_fd is not None:
                os.write(ready_fd, b"ok")
                os.close(ready_fd)
            code = Supervisor(exp).run()
            os.write(done_fd, b"done")
            os.close(done_fd)
            return code
    except LockBusy as busy:
        print(f"another supervisor runs experiment {exp.name} ({busy.holder}); this one exits", file=sys.stderr)
        return 1


def start_watchdog(exp: ExperimentDir, generation: str) -> tuple[int, subprocess.Popen]:
    """The watchdog reads a pipe whose only writer is this process (the trainers do not inherit it): EOF
    without "done" means we died."""
    read_end, write_end = os.pipe()
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-m", MODULE, str(exp.root), "--watchdog", generation],
            stdin=read_end, start_new_session=True,
        )
    finally:
        os.close(read_end)
    return write_end, watchdog


def watchdog(exp: ExperimentDir, generation: str) -> int:
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    said = b""
    while chunk := os.read(0, 64):
        said += chunk
    leftovers = experiment_processes(exp.key, generation=generation)
    if not said.endswith(b"done"):
        print(f"watchdog: the supervisor of {exp.name} died; stopping its {len(leftovers)} processes",
              file=sys.stderr, flush=True)
    terminate(leftovers, grace_seconds())
    if said.endswith(b"done"):
        return 0
    try:
        with experiment_lock(exp.name, "the watchdog of a dead supervisor", wait=3600):
            if exp.supervisor().get("generation") != generation:
                return 0  # a newer submission owns the experiment now
            for run in exp.run_names():
                if not exp.finished(run):
                    exp.set_state(run, phase=RunPhase.Failed.value, end_time=now(), reason="SupervisorLost",
                                  message=SUPERVISOR_LOST)
    except LockBusy:
        pass  # `get` says the same from the dead supervisor
    return 0


def main(argv: list[str]) -> int:
    exp = ExperimentDir(Path(argv[0]))
    if "--watchdog" in argv[1:]:
        return watchdog(exp, argv[argv.index("--watchdog") + 1])
    ready_fd = None
    if "--detach" in argv[1:]:
        # Fork: the parent waits until the child has taken the experiment and says so, then exits; the CLI
        # that started us waits only for the parent, so the supervisor is never its zombie.
        read_end, ready_fd = os.pipe()
        if os.fork():
            os.close(ready_fd)
            with os.fdopen(read_end, "rb") as answer:
                os._exit(0 if answer.read() == b"ok" else 1)
        os.close(read_end)
    return serve(exp, ready_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
