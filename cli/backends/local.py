"""Runs on this machine: a detached supervisor executes each run as a real `torchrun` subprocess.

State lives under $DLMCTL_HOME (layout in local_state.py). submit() checks everything before it
writes anything, builds the experiment in a hidden staging folder and renames it into place, so
a failed submit leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import yaml

from ..errors import NotFound, UserError
from .base import Backend, ExperimentSummary
from .local_state import (
    ExperimentDir,
    descendants,
    experiments_dir,
    iter_experiment_dirs,
    kill_all,
    now,
    pid_alive,
    read_events,
    read_lines,
    read_json,
    write_json,
)

if TYPE_CHECKING:
    from dlmctl.spec import Experiment, ExperimentStatus

FOLLOW_POLL_SECONDS = 0.2
SUPERVISOR = "dlmctl.cli.backends.local_supervisor"


class LocalBackend(Backend):
    name = "local"

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, experiment: "Experiment", replace: bool = False) -> list[str]:
        from dlmctl.spec.contracts import RunPhase

        runs = experiment.runs()
        for run in runs:
            if run.spec.resources.nodes != 1:
                raise UserError(
                    f"spec.resources.nodes: the local backend runs on this machine only, so nodes must be 1 "
                    f"(run {run.name} asks for {run.spec.resources.nodes}); submit to a cluster instead"
                )
        name = experiment.metadata.name
        target = experiments_dir() / name
        if target.exists():
            if not replace:
                phase = self._status(ExperimentDir(target)).phase
                raise UserError(
                    f"metadata.name: experiment {name!r} already exists ({phase}); "
                    f"pass --replace to start it again, or choose another name"
                )
            if not self._status(ExperimentDir(target)).phase.terminal:
                self.cancel(name)

        experiments_dir().mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=experiments_dir(), prefix=f".{name}."))
        try:
            exp = ExperimentDir(staging)
            document = experiment.model_dump(mode="json", exclude={"status"})
            exp.experiment_yaml.write_text(yaml.safe_dump(document, sort_keys=False))
            write_json(exp.supervisor_json, {"runs": [r.name for r in runs], "submitted": now()})
            for run in runs:
                exp.run_dir(run.name).mkdir(parents=True)
                exp.run_json(run.name).write_text(run.model_dump_json(indent=1))
                exp.set_state(run.name, phase=RunPhase.Pending.value)
            if target.exists():
                old = target.with_name(f".{name}.replaced.{os.getpid()}")
                os.rename(target, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(staging, target)
            except OSError:  # another submit of the same name got there first
                raise UserError(f"metadata.name: experiment {name!r} was just created by another submit") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._start_supervisor(ExperimentDir(target))
        return [r.name for r in runs]

    def _start_supervisor(self, exp: ExperimentDir) -> None:
        from dlmctl.spec.contracts import RunPhase

        with open(exp.supervisor_log, "ab") as log:
            done = subprocess.run(
                [sys.executable, "-m", SUPERVISOR, str(exp.root), "--detach"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, timeout=60,
            )
        if done.returncode != 0 or not read_json(exp.supervisor_json, {}).get("pid"):
            for run in exp.run_names():
                exp.set_state(run, phase=RunPhase.Failed.value, end_time=now(), message=f"the supervisor did not start; see {exp.supervisor_log}")
            raise RuntimeError(f"the local supervisor did not start; see {exp.supervisor_log}")

    # -- list / get -----------------------------------------------------------------------------
    def list(self) -> list[ExperimentSummary]:
        from dlmctl.spec.contracts import RunPhase

        summaries = []
        for exp in iter_experiment_dirs():
            status = self._status(exp)
            submitted = read_json(exp.supervisor_json, {}).get("submitted")
            summaries.append(
                ExperimentSummary(
                    name=exp.name, phase=status.phase, runs=len(status.runs),
                    succeeded=sum(r.phase is RunPhase.Succeeded for r in status.runs),
                    created=datetime.fromisoformat(submitted) if submitted else None,
                )
            )
        return sorted(summaries, key=lambda s: (s.created is None, s.created or 0, s.name))

    def get(self, name: str) -> "Experiment":
        from dlmctl.spec import experiment_from_dict

        exp = self._dir(name)
        experiment = experiment_from_dict(yaml.safe_load(exp.experiment_yaml.read_text()), str(exp.experiment_yaml))
        return experiment.model_copy(update={"status": self._status(exp)})

    def _status(self, exp: ExperimentDir) -> "ExperimentStatus":
        from dlmctl.spec import ExperimentStatus, RunStatus
        from dlmctl.spec.contracts import RunPhase, experiment_phase

        supervisor = read_json(exp.supervisor_json, {})
        supervisor_gone = bool(supervisor.get("pid")) and not pid_alive(supervisor.get("pid"))
        run_docs = {r: read_json(exp.run_json(r), {}) for r in exp.run_names()}
        runs = []
        for run, doc in run_docs.items():
            state = exp.state(run)
            phase, message = RunPhase(state.get("phase", RunPhase.Pending)), state.get("message")
            if not phase.terminal and supervisor_gone:
                phase, message = RunPhase.Failed, "the local supervisor exited before this run finished"
            runs.append(
                RunStatus(
                    name=run, arm=doc.get("arm", "diffusion"), phase=phase, message=message,
                    startTime=state.get("start_time"), completionTime=state.get("end_time"),
                    **_progress(exp.metrics(run)),
                )
            )
        phases = [r.phase for r in runs]
        phase = experiment_phase(phases)
        ends = [r.completionTime for r in runs if r.completionTime]
        return ExperimentStatus(
            phase=phase, runs=runs,
            progress=f"{phases.count(RunPhase.Succeeded)}/{len(phases)}",
            startTime=supervisor.get("start_time"),
            completionTime=max(ends) if ends and phase.terminal else None,
        )

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
        pid = read_json(exp.supervisor_json, {}).get("pid")
        return bool(pid) and not pid_alive(pid)

    def cancel(self, name: str) -> None:
        from dlmctl.spec.contracts import RunPhase

        exp = self._dir(name)
        supervisor = read_json(exp.supervisor_json, {})
        pid, pgid = supervisor.get("pid"), supervisor.get("pgid")
        if pid_alive(pid):
            tree = descendants(pid)
            _kill(pid, pgid, signal.SIGTERM)
            from .local_supervisor import grace_seconds

            deadline = time.monotonic() + grace_seconds() + 5  # the supervisor itself waits `grace` for its runs
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                tree.update(descendants(pid))
                _kill(pid, pgid, signal.SIGKILL)
            kill_all(tree, signal.SIGKILL)  # torchrun workers live in their own sessions
        for run in exp.run_names():
            if not exp.finished(run):
                exp.set_state(run, phase=RunPhase.Cancelled.value, end_time=now(), message="cancelled")

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


PROGRESS_FIELDS = {"step", "total_steps", "epoch", "tokens", "train_loss", "val_loss", "val_loss_stderr",
                   "choice_accuracy", "unigram_entropy", "last_checkpoint"}  # RunProgress -> RunStatus


def _progress(metrics: Path) -> dict[str, Any]:
    """The run's position, losses and newest checkpoint, folded from its metrics events."""
    from dlmctl.spec.contracts import fold_progress

    events, _ = read_events(metrics)
    return fold_progress(events).model_dump(include=PROGRESS_FIELDS)


def _kill(pid: int, pgid: Optional[int], signum: int) -> None:
    try:
        if pgid and pgid != os.getpgrp():
            os.killpg(pgid, signum)  # the supervisor, its runs and their torchrun workers
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass
