"""Runs on this machine: a detached supervisor executes each run as a real `torchrun` subprocess.

State lives under $DLMCTL_HOME (layout in local_state.py). Every command that changes an experiment
holds its lock, so concurrent submits of one name cannot both start it: one wins, the other is told
which experiment is busy. submit() checks everything before it writes anything; a new experiment is
built in a hidden staging folder and renamed into place, so a failed submit leaves nothing behind.

Submitting is idempotent and never throws work away: submitting the spec an experiment already has
resumes its unfinished runs from their newest checkpoints (nothing happens while it runs or once every
run has succeeded); `--replace` swaps in a different spec, and its runs too resume from the checkpoints
in their run folders; only `--fresh` starts runs over at step 0 (their previous outputs are set aside
under previous/, and the trainer is told DLMCTL_FRESH=1 to ignore checkpoints stored elsewhere).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import yaml

from dlmctl.spec.settings import FRESH_ENV

from ..errors import NotFound, UserError
from .base import Backend, Comparison, ExperimentSummary
from .local_state import (
    EXPERIMENT_ENV,
    MARKERS,
    RUN_ENV,
    CorruptState,
    ExperimentDir,
    LockBusy,
    ProgressFollower,
    corrupt,
    experiment_lock,
    experiments_dir,
    find_process,
    home,
    iter_experiment_dirs,
    newest_checkpoint_step,
    now,
    read_events,
    read_json,
    read_lines,
    running,
    terminate,
    wait_gone,
    write_json,
    write_text,
)

if TYPE_CHECKING:
    import psutil

    from dlmctl.spec import Experiment, ExperimentStatus

FOLLOW_POLL_SECONDS = 0.2
SUPERVISOR = "dlmctl.cli.backends.local_supervisor"
UNKNOWN_PHASE = "Unknown"  # `list` for an experiment whose state cannot be read


class LocalBackend(Backend):
    name = "local"

    def __init__(self):
        self._progress = ProgressFollower()  # `get --wait` asks every second: read only what was appended

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, experiment: "Experiment", replace: bool = False, fresh: bool = False) -> list[str]:
        from dlmctl.spec import absolute_local_paths, check_local_paths

        check_local_paths(experiment)  # what this machine must read is here, before anything is written
        experiment = absolute_local_paths(experiment)  # the trainers run in their own folders
        runs = experiment.runs()
        for run in runs:
            if run.spec.resources.nodes != 1:
                raise UserError(
                    f"spec.resources.nodes: the local backend runs on this machine only, so nodes must be 1 "
                    f"(run {run.name} asks for {run.spec.resources.nodes}); submit to a cluster instead"
                )
        name = experiment.metadata.name
        try:
            with experiment_lock(name, "submit", wait=2.0):
                self._submit(ExperimentDir(experiments_dir() / name), experiment, replace, fresh)
        except LockBusy as busy:
            raise UserError(
                f"metadata.name: experiment {name!r} is being changed by another dlmctl command right now "
                f"({busy.holder}); see `dlmctl get {name}`, or try again when that command has finished"
            ) from None
        return [r.name for r in runs]

    def _submit(self, exp: ExperimentDir, experiment: "Experiment", replace: bool, fresh: bool) -> None:
        from dlmctl.spec.contracts import RunPhase

        if not exp.root.exists():
            self._create(exp, experiment, fresh)
            self._start_supervisor(exp)
            return
        name = exp.name
        try:
            same = _spec_of(self._load_experiment(exp)) == _spec_of(experiment)
            phase, damage = self._status(exp, _Processes()).phase, None
        except CorruptState as err:
            same, phase, damage = False, UNKNOWN_PHASE, err
        if not same and not replace:
            if damage is not None:
                problem = str(damage).removeprefix(f"experiment {name!r}: ")
                raise UserError(f"metadata.name: experiment {name!r} already exists, but {problem}")
            raise UserError(
                f"metadata.name: experiment {name!r} already exists ({phase}) with a different spec; pass --replace "
                f"to replace it (runs of the same name resume from their checkpoints; --fresh starts them over), "
                f"or choose another name"
            )
        if same and not replace and not fresh:
            if all(exp.state(r.name).get("phase") == RunPhase.Succeeded.value for r in experiment.runs()):
                _note(f"experiment {name} already succeeded with this spec; nothing to do "
                      f"(`dlmctl submit --fresh` trains it again from step 0)")
                return
            supervisor = find_process(exp.supervisor(), cmdline=str(exp.root))
            if supervisor is not None:
                if not all(exp.finished(r) for r in exp.run_names()):
                    _note(f"experiment {name} already runs this spec; nothing to change")
                    return
                wait_gone([supervisor], 10)  # its runs have ended; it is on its way out
        self._stop(exp)
        self._resubmit(exp, experiment, fresh)
        self._start_supervisor(exp)

    def _create(self, exp: ExperimentDir, experiment: "Experiment", fresh: bool) -> None:
        exp.root.parent.mkdir(parents=True, exist_ok=True)
        staging = ExperimentDir(Path(tempfile.mkdtemp(dir=exp.root.parent, prefix=f".{exp.name}.")))
        try:
            runs = experiment.runs()
            for run in runs:
                staging.run_dir(run.name).mkdir(parents=True)
                staging.run_json(run.name).write_text(run.model_dump_json(indent=1))
                write_json(staging.state_json(run.name), _pending_state(fresh))
            staging.experiment_yaml.write_text(_document(experiment))
            write_json(staging.supervisor_json, _submission(experiment, fresh))
            os.rename(staging.root, exp.root)
        except BaseException:
            shutil.rmtree(staging.root, ignore_errors=True)
            raise

    def _resubmit(self, exp: ExperimentDir, experiment: "Experiment", fresh: bool) -> None:
        """Give an existing, stopped experiment its new (or same) spec. A run keeps its folder -- its log,
        metrics and checkpoints -- and so resumes, unless `fresh`; one that succeeded with the same run spec
        stays succeeded."""
        import json

        from dlmctl.spec.contracts import RunPhase

        stamp = datetime.now().strftime("%Y%m%dT%H%M%S%f")
        previous = set(exp.run_names())
        for run in experiment.runs():
            folder, text = exp.run_dir(run.name), run.model_dump_json(indent=1)
            state = exp.state(run.name)
            unchanged = read_json(exp.run_json(run.name)) == json.loads(text) and run.name in previous
            if unchanged and not fresh and state.get("phase") == RunPhase.Succeeded.value:
                continue
            if fresh and folder.exists():
                aside = exp.previous_dir / f"{run.name}.{stamp}"
                aside.parent.mkdir(exist_ok=True)
                os.rename(folder, aside)
                _note(f"{run.name} starts over at step 0; its previous output is kept in {aside}")
            folder.mkdir(parents=True, exist_ok=True)
            if not fresh:
                step = newest_checkpoint_step(exp.metrics(run.name))
                if step is not None:
                    _note(f"{run.name} resumes from its checkpoint at step {step} (`--fresh` starts it over)")
            write_text(exp.run_json(run.name), text)
            write_json(exp.state_json(run.name), _pending_state(fresh, keep=state.get("fresh")))
        write_text(exp.experiment_yaml, _document(experiment))
        write_json(exp.supervisor_json, _submission(experiment, fresh))

    def _start_supervisor(self, exp: ExperimentDir) -> None:
        from dlmctl.spec.contracts import RunPhase

        env = {k: v for k, v in os.environ.items() if k not in (*MARKERS, FRESH_ENV)}
        with open(exp.supervisor_log, "ab") as log:
            done = subprocess.run(
                [sys.executable, "-m", SUPERVISOR, str(exp.root), "--detach"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, timeout=60, env=env,
            )
        if done.returncode != 0 or not exp.supervisor().get("pid"):
            for run in exp.run_names():
                if not exp.finished(run):
                    exp.set_state(run, phase=RunPhase.Failed.value, end_time=now(),
                                  message=f"the supervisor did not start; see {exp.supervisor_log}")
            raise RuntimeError(f"the local supervisor did not start; see {exp.supervisor_log}")

    # -- list / get -----------------------------------------------------------------------------
    def list(self) -> list[ExperimentSummary]:
        from dlmctl.spec.contracts import RunPhase

        summaries, processes = [], _Processes()
        for exp in iter_experiment_dirs():
            try:
                self._load_experiment(exp)
                status = self._status(exp, processes)
                phase, runs = status.phase, len(status.runs)
                succeeded = sum(r.phase is RunPhase.Succeeded for r in status.runs)
            except CorruptState as err:
                print(f"warning: {err}", file=sys.stderr)
                names = exp.run_names()
                phase, runs = UNKNOWN_PHASE, len(names)
                succeeded = sum(exp.state(r).get("phase") == RunPhase.Succeeded.value for r in names)
            submitted = exp.supervisor().get("submitted")
            try:
                created = datetime.fromisoformat(submitted) if isinstance(submitted, str) else None
            except ValueError:
                created = None
            summaries.append(ExperimentSummary(name=exp.name, phase=phase, runs=runs, succeeded=succeeded,
                                               created=created))
        return sorted(summaries, key=lambda s: (s.created is None, s.created or 0, s.name))

    def get(self, name: str) -> "Experiment":
        exp = self._dir(name)
        experiment = self._load_experiment(exp)
        return experiment.model_copy(update={"status": self._status(exp, _Processes())})

    def compare(self, name: str) -> Comparison:
        from dlmctl.spec.contracts import EvalEvent

        experiment = self.get(name)
        exp = self._dir(name)
        evals = {status.name: [e for e in read_events(exp.metrics(status.name), experiment=name)[0]
                               if isinstance(e, EvalEvent)] for status in experiment.status.runs}
        return Comparison(experiment, evals)

    def _load_experiment(self, exp: ExperimentDir) -> "Experiment":
        from dlmctl.spec import SpecError, experiment_from_dict
        from dlmctl.spec.load import read_spec_file

        path = exp.experiment_yaml
        try:
            experiment = experiment_from_dict(read_spec_file(path), str(path))
        except SpecError as err:
            problem = str(err).removeprefix(f"{path}: ")
            raise corrupt(exp.name, path, f"is not a valid experiment ({problem})") from None
        if experiment.metadata.name != exp.name:
            raise corrupt(exp.name, path, f"describes experiment {experiment.metadata.name!r}")
        return experiment

    def _status(self, exp: ExperimentDir, processes: "_Processes") -> "ExperimentStatus":
        """The experiment's state as its files and its live processes tell it; CorruptState if a file
        cannot be read (never a guess: a damaged experiment must not look finished)."""
        from dlmctl.spec import ExperimentStatus, RunStatus
        from dlmctl.spec.contracts import RunPhase, experiment_phase
        from dlmctl.spec.experiment import status_progress

        from .local_supervisor import SUPERVISOR_LOST

        supervisor = exp.load_supervisor()
        if supervisor.get("pid"):
            gone = find_process(supervisor, cmdline=str(exp.root)) is None
        else:  # the submit that wrote supervisor.json is starting it, or died before it could
            gone = not _lock_held(home() / "locks" / f"{exp.name}.lock")
        runs = []
        for run in supervisor["runs"]:
            state, doc = exp.load_state(run), exp.load_run(run)
            progress = status_progress(self._progress.read(exp.metrics(run), exp.name))
            phase, reason, message = RunPhase(state["phase"]), state.get("reason"), state.get("message")
            if not phase.terminal and gone:
                left = processes.of(exp.key, run)
                if left:
                    phase, reason = RunPhase.Running, "SupervisorLost"
                    message = (f"the local supervisor is gone, but this run still has {len(left)} processes "
                               f"(pid {', '.join(str(p) for p in left)}); `dlmctl cancel {exp.name}` stops them")
                elif supervisor.get("pid"):
                    phase, reason, message = RunPhase.Failed, "SupervisorLost", SUPERVISOR_LOST
                else:
                    phase, reason = RunPhase.Failed, "SupervisorLost"
                    message = f"the local supervisor never started; see {exp.supervisor_log}"
            try:
                runs.append(RunStatus(
                    name=run, arm=doc["arm"], phase=phase, reason=reason, message=message,
                    restarts=state.get("restarts", 0), startTime=state.get("start_time"),
                    completionTime=state.get("end_time"), **progress,
                ))
            except ValueError as err:
                raise corrupt(exp.name, exp.state_json(run), f"does not describe a run ({str(err).splitlines()[0]})") from None
        phases = [r.phase for r in runs]
        phase = experiment_phase(phases)
        ends = [r.completionTime for r in runs if r.completionTime]
        try:
            return ExperimentStatus(
                phase=phase, runs=runs,
                progress=f"{phases.count(RunPhase.Succeeded)}/{len(phases)}",
                startTime=supervisor.get("start_time"),
                completionTime=max(ends) if ends and phase.terminal else None,
            )
        except ValueError as err:
            raise corrupt(exp.name, exp.supervisor_json, f"is not valid ({str(err).splitlines()[0]})") from None

    # -- logs / cancel --------------------------------------------------------------------------
    def logs(self, name: str, run: Optional[str] = None, follow: bool = False) -> Iterator[str]:
        exp = self._dir(name)
        runs = exp.run_names()
        if run is not None and run not in runs:
            raise NotFound(f"--run: experiment {name!r} has no run {run!r} (its runs: {', '.join(runs)})")
        selected = [run] if run else runs
        prefix = (lambda r: f"[{r}] ") if len(selected) > 1 else (lambda r: "")
        offsets = {r: 0 for r in selected}
        while True:
            for r in selected:
                lines, offsets[r] = read_lines(exp.train_log(r), offsets[r])
                for line in lines:
                    yield prefix(r) + line
            if not follow:
                return
            if all(self._finished(exp, r) for r in selected):
                for r in selected:  # whatever was written between the last read and the end
                    lines, offsets[r] = read_lines(exp.train_log(r), offsets[r], final=True)
                    for line in lines:
                        yield prefix(r) + line
                return
            time.sleep(FOLLOW_POLL_SECONDS)

    def _finished(self, exp: ExperimentDir, run: str) -> bool:
        if exp.finished(run):
            return True
        supervisor = exp.supervisor()
        return bool(supervisor.get("pid")) and find_process(supervisor, cmdline=str(exp.root)) is None

    def cancel(self, name: str) -> None:
        from dlmctl.spec.contracts import RunPhase

        from .local_supervisor import grace_seconds

        exp = self._dir(name)
        try:
            with experiment_lock(name, "cancel", wait=2 * grace_seconds() + 60):
                self._stop(exp)
                for run in _run_names(exp):
                    if not exp.finished(run):
                        exp.set_state(run, phase=RunPhase.Cancelled.value, end_time=now(), reason=None,
                                      message="cancelled")
        except LockBusy as busy:
            raise UserError(f"experiment {name!r} is being changed by another dlmctl command ({busy.holder}); "
                            f"try again when it has finished") from None

    def _stop(self, exp: ExperimentDir) -> None:
        """Stop every process of the experiment this can find: its supervisor (which stops its runs, each
        trainer checkpointing where it is), then whatever still carries the experiment's marker -- orphans
        of an earlier supervisor included -- and the trainers its state files name. Reads damaged files as
        missing: stopping must work when nothing else does."""
        import psutil

        from .local_supervisor import grace_seconds

        grace = grace_seconds()
        info = exp.supervisor()
        supervisor = find_process(info, cmdline=str(exp.root))
        tree: list[psutil.Process] = []
        if supervisor is not None:
            tree = _children(supervisor)
            with contextlib.suppress(psutil.Error):
                supervisor.terminate()
            if wait_gone([supervisor], grace + 5):  # it waits `grace` for its runs itself
                tree += _children(supervisor)
                with contextlib.suppress(psutil.Error):
                    supervisor.kill()
                wait_gone([supervisor], 10)
        left = {p.pid: p for p in tree if running(p)}
        left.update({p.pid: p for p in _experiment_processes(exp)})
        for run in _run_names(exp):
            trainer = find_process(exp.state(run), cmdline=str(exp.run_dir(run)))
            if trainer is not None:
                left[trainer.pid] = trainer
        terminate(left.values(), grace)

    def artifacts(self, run: str) -> str:
        for exp in iter_experiment_dirs():
            if exp.run_json(run).is_file():
                return str(exp.run_dir(run))
        raise NotFound(f"no run named {run!r} (dlmctl get EXPERIMENT lists its runs)")

    # -- helpers --------------------------------------------------------------------------------
    def _dir(self, name: str) -> ExperimentDir:
        exp = ExperimentDir(experiments_dir() / name)
        if "/" in name or name.startswith(".") or not exp.experiment_yaml.is_file():
            raise NotFound(f"no experiment named {name!r} (dlmctl list shows them)")
        return exp


class _Processes:
    """The processes of local experiments by experiment and run, read from their environments once and
    only if some experiment needs them (its supervisor is gone but a run was not finished)."""

    def __init__(self):
        self._found: Optional[dict[tuple[str, str], list[int]]] = None

    def of(self, experiment: str, run: str) -> list[int]:
        if self._found is None:
            import psutil

            self._found = {}
            for process in psutil.process_iter():
                try:
                    env = process.environ()
                except (psutil.Error, OSError):
                    continue
                if EXPERIMENT_ENV in env and process.pid != os.getpid():
                    self._found.setdefault((env[EXPERIMENT_ENV], env.get(RUN_ENV, "")), []).append(process.pid)
        return sorted(self._found.get((experiment, run), []))


def _spec_of(experiment: "Experiment") -> dict[str, Any]:
    return experiment.model_dump(mode="json", exclude={"status"})


def _document(experiment: "Experiment") -> str:
    return yaml.safe_dump(_spec_of(experiment), sort_keys=False)


def _submission(experiment: "Experiment", fresh: bool) -> dict[str, Any]:
    """supervisor.json of a new submission: run order, time, and the generation its processes carry."""
    return {"runs": [r.name for r in experiment.runs()], "submitted": now(), "generation": uuid.uuid4().hex,
            **({"fresh": True} if fresh else {})}


def _pending_state(fresh: bool, keep: Any = None) -> dict[str, Any]:
    """`fresh` holds a token of this submission: the trainer's DLMCTL_FRESH, so its checkpoints are told
    apart from an earlier fresh start's (a second `--fresh` must not resume the first one)."""
    from dlmctl.spec.contracts import RunPhase

    token = uuid.uuid4().hex[:12] if fresh else (keep if isinstance(keep, str) else None)
    return {"phase": RunPhase.Pending.value, "restarts": 0, **({"fresh": token} if token else {})}


def _run_names(exp: ExperimentDir) -> list[str]:
    """The runs supervisor.json lists, else (it is damaged) every run folder with a run.json."""
    names = exp.run_names()
    if names or not exp.runs_dir.is_dir():
        return names
    return sorted(p.name for p in exp.runs_dir.iterdir() if (p / "run.json").is_file())


def _experiment_processes(exp: ExperimentDir) -> list["psutil.Process"]:
    from .local_state import experiment_processes

    return experiment_processes(exp.key)


def _children(process: "psutil.Process") -> list["psutil.Process"]:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _lock_held(path: Path) -> bool:
    """Whether some process holds the lock file now (False if there is none); creates nothing."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)
