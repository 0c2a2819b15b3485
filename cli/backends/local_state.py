"""What the local backend keeps under $DLMCTL_HOME, shared by the CLI and the supervisor process.

    $DLMCTL_HOME/experiments/<name>/experiment.yaml     the experiment as submitted (defaults filled in)
                                    supervisor.json     run order, supervisor pid and process group
                                    supervisor.log      the supervisor's own output
                                    runs/<run>/run.json       the Run (Run.model_dump_json())
                                    runs/<run>/state.json     phase, pid, exit code, start/end times
                                    runs/<run>/train.log      the trainer's stdout and stderr
                                    runs/<run>/metrics.jsonl  the trainer's metrics events (spec.contracts)

Phase names and their rules come from dlmctl.spec.contracts, imported inside the functions that use
them: the CLI starts without pydantic.
"""
from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

HOME_ENV = "DLMCTL_HOME"


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".dlmctl").expanduser()


def experiments_dir() -> Path:
    return home() / "experiments"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ExperimentDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def name(self) -> str:
        return self.root.name

    experiment_yaml = property(lambda self: self.root / "experiment.yaml")
    supervisor_json = property(lambda self: self.root / "supervisor.json")
    supervisor_log = property(lambda self: self.root / "supervisor.log")
    runs_dir = property(lambda self: self.root / "runs")

    def run_dir(self, run: str) -> Path:
        return self.runs_dir / run

    def run_json(self, run: str) -> Path:
        return self.run_dir(run) / "run.json"

    def state_json(self, run: str) -> Path:
        return self.run_dir(run) / "state.json"

    def train_log(self, run: str) -> Path:
        return self.run_dir(run) / "train.log"

    def metrics(self, run: str) -> Path:
        from dlmctl.spec.contracts import METRICS_FILE

        return self.run_dir(run) / METRICS_FILE

    def run_names(self) -> list[str]:
        return list(read_json(self.supervisor_json, {}).get("runs", []))

    def state(self, run: str) -> dict[str, Any]:
        return read_json(self.state_json(run), {"phase": "Pending"})

    def finished(self, run: str) -> bool:
        """The run's recorded phase is terminal (Succeeded, Failed or Cancelled)."""
        from dlmctl.spec.contracts import TERMINAL_RUN_PHASES

        return self.state(run).get("phase") in TERMINAL_RUN_PHASES

    def set_state(self, run: str, **changes: Any) -> dict[str, Any]:
        state = {**self.state(run), **changes}
        write_json(self.state_json(run), state)
        return state


def write_json(path: Path, data: Any) -> None:
    """Atomic: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def read_lines(path: Path, offset: int = 0, final: bool = False) -> tuple[list[str], int]:
    """Complete lines from `offset` (a line still being written is read next time, unless `final`);
    returns them and the offset to continue from."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = len(data) if final else data.rfind(b"\n") + 1
    return data[:end].decode("utf-8", errors="replace").splitlines(), offset + end


def read_events(path: Path, offset: int = 0) -> tuple[list, int]:
    """The metrics events (spec.contracts models) of the complete lines from `offset`; returns them and
    the offset to continue from. Lines that are not events are skipped."""
    from dlmctl.spec.contracts import parse_event

    lines, offset = read_lines(path, offset)
    events = []
    for line in lines:
        try:
            event = parse_event(json.loads(line))
        except ValueError:
            continue
        if event is not None:
            events.append(event)
    return events, offset


def pid_alive(pid: Optional[int]) -> bool:
    """True while the process exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return not Path("/proc/self").exists()  # no /proc (macOS): trust kill(0)
    except OSError:
        return True


def iter_experiment_dirs() -> Iterator[ExperimentDir]:
    root = experiments_dir()
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.is_dir() and not path.name.startswith(".") and (path / "experiment.yaml").is_file():
            yield ExperimentDir(path)


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its start time (Linux /proc; empty elsewhere). torchrun starts
    its workers in their own sessions, so a process-group signal alone would not reach them."""
    children: dict[int, list[tuple[int, str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields[19]))
        except (OSError, ValueError, IndexError):
            continue
    found: dict[int, str] = {}
    queue = [pid]
    while queue:
        for child, started in children.get(queue.pop(), []):
            found[child] = started
            queue.append(child)
    return found


def kill_all(processes: dict[int, str], signum: int) -> None:
    """Signal each process that is still the one we saw (same start time), never a recycled pid."""
    for pid, started in processes.items():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19] != started:
                continue
            os.kill(pid, signum)
        except (OSError, IndexError):
            pass
