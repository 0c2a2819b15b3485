"""What the local backend keeps under $DLMCTL_HOME, shared by the CLI, the supervisor and its watchdog.

    $DLMCTL_HOME/locks/<name>.lock                      held while a command changes experiment <name>
    $DLMCTL_HOME/experiments/<name>/experiment.yaml     the experiment as submitted (defaults filled in)
                                    supervisor.json     run order, submission generation, the supervisor's
                                                        and its watchdog's pid and start
                                    supervisor.lock     held by the live supervisor (one per experiment)
                                    supervisor.log      the supervisor's own output
                                    runs/<run>/run.json       the Run (Run.model_dump_json())
                                    runs/<run>/state.json     phase, restarts, trainer pid and start, exit
                                                              code, start/end times, message
                                    runs/<run>/train.log      the trainer's stdout and stderr (every life)
                                    runs/<run>/metrics.jsonl  the trainer's metrics events (spec.contracts)
                                    runs/<run>/checkpoints/   the default checkpoint store: a resubmitted
                                                              or restarted run resumes from it
                                    previous/<run>.<time>/    a run's output set aside by `submit --fresh`

A process is known by its pid *and* its start (`process_start`), never by its pid alone: a pid can be
reused by an unrelated process. Every trainer process (torchrun, its workers, whatever they start)
carries the experiment, run and submission generation in its environment, so the experiment's
processes can be found even when they are no longer below their supervisor.

Phase names and their rules come from dlmctl.spec.contracts, and psutil is imported inside the
functions that use them: the CLI starts without them.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Optional

from ..errors import UserError

from dlmctl.spec.files import write_atomically
from dlmctl.spec.settings import ClientSettings, read

if TYPE_CHECKING:
    import psutil

    from dlmctl.spec.contracts import RunProgress

# In every trainer process's environment: which experiment (its folder), run and submission it belongs to.
EXPERIMENT_ENV = "DLMCTL_LOCAL_EXPERIMENT"
RUN_ENV = "DLMCTL_LOCAL_RUN"
GENERATION_ENV = "DLMCTL_LOCAL_GENERATION"
MARKERS = (EXPERIMENT_ENV, RUN_ENV, GENERATION_ENV)


def home() -> Path:
    return read(ClientSettings).home.expanduser()


def experiments_dir() -> Path:
    return home() / "experiments"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class CorruptState(UserError):
    """A state file of an experiment cannot be read; the message names the file."""


class ExperimentDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def key(self) -> str:
        """How the experiment's processes name it (EXPERIMENT_ENV): its folder's real path."""
        return os.path.realpath(self.root)

    experiment_yaml = property(lambda self: self.root / "experiment.yaml")
    supervisor_json = property(lambda self: self.root / "supervisor.json")
    supervisor_lock = property(lambda self: self.root / "supervisor.lock")
    supervisor_log = property(lambda self: self.root / "supervisor.log")
    runs_dir = property(lambda self: self.root / "runs")
    previous_dir = property(lambda self: self.root / "previous")

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

    # Tolerant readers (the supervisor, cancel): a damaged file reads as missing.
    def supervisor(self) -> dict[str, Any]:
        return read_json(self.supervisor_json, {})

    def run_names(self) -> list[str]:
        runs = self.supervisor().get("runs")
        return [r for r in runs if isinstance(r, str)] if isinstance(runs, list) else []

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

    # Strict readers (get, list): a damaged file raises CorruptState naming it.
    def load_supervisor(self) -> dict[str, Any]:
        info = load_json(self.supervisor_json, self.name)
        runs = info.get("runs")
        if not isinstance(runs, list) or not all(isinstance(r, str) and r for r in runs):
            raise corrupt(self.name, self.supervisor_json, "has no list of run names ('runs')")
        submitted = info.get("submitted")
        if submitted is not None and not _is_time(submitted):
            raise corrupt(self.name, self.supervisor_json, f"'submitted' is not a time: {submitted!r}")
        return info

    def load_state(self, run: str) -> dict[str, Any]:
        from dlmctl.spec.contracts import RunPhase

        path = self.state_json(run)
        if not path.exists() and self.run_json(run).is_file():
            return {"phase": RunPhase.Pending.value}  # written with run.json; absent only while submitting
        state = load_json(path, self.name)
        if state.get("phase") not in {p.value for p in RunPhase}:
            raise corrupt(self.name, path, f"'phase' is not a run phase: {state.get('phase')!r}")
        for key in ("start_time", "end_time"):
            if state.get(key) is not None and not _is_time(state[key]):
                raise corrupt(self.name, path, f"{key!r} is not a time: {state[key]!r}")
        if not isinstance(state.get("restarts", 0), int) or state.get("restarts", 0) < 0:
            raise corrupt(self.name, path, f"'restarts' is not a count: {state.get('restarts')!r}")
        return state

    def load_run(self, run: str) -> dict[str, Any]:
        from dlmctl.spec.sections import Arm

        path = self.run_json(run)
        doc = load_json(path, self.name)
        if doc.get("name") != run or doc.get("arm") not in {a.value for a in Arm}:
            raise corrupt(self.name, path, f"is not the run {run!r} (name {doc.get('name')!r}, arm {doc.get('arm')!r})")
        return doc


def corrupt(experiment: str, path: Path, problem: str) -> CorruptState:
    problem = " ".join(problem.split())
    return CorruptState(
        f"experiment {experiment!r}: its state file {path} {problem}; dlmctl cannot tell what this experiment is "
        f"doing -- repair or remove that file, or start the experiment again with `dlmctl submit SPEC --replace` "
        f"(its runs resume from their checkpoints)"
    )


def _is_time(value: Any) -> bool:
    try:
        datetime.fromisoformat(value)
        return True
    except (TypeError, ValueError):
        return False


def write_json(path: Path, data: Any) -> None:
    """Atomic: readers never see a half-written file."""
    write_text(path, json.dumps(data, indent=1))


def write_text(path: Path, text: str) -> None:
    """Atomic: readers never see a half-written file."""
    write_atomically(path, text)


def read_json(path: Path, default: Any = None) -> Any:
    """The file's JSON; `default` if it is missing, unreadable, or not of the default's type."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return default
    if default is not None and not isinstance(data, type(default)):
        return default
    return data


def load_json(path: Path, experiment: str) -> dict[str, Any]:
    """A JSON object, or CorruptState naming the file."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise corrupt(experiment, path, "is missing") from None
    except OSError as err:
        raise corrupt(experiment, path, f"cannot be read ({err.strerror})") from None
    except ValueError as err:
        raise corrupt(experiment, path, f"is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise corrupt(experiment, path, f"holds a {type(data).__name__}, not a JSON object")
    return data


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


def read_events(path: Path, offset: int = 0, experiment: Optional[str] = None) -> tuple[list, int]:
    """The metrics events (spec.contracts models) of the complete lines from `offset`; returns them and
    the offset to continue from. Other tools' lines (JSON objects that are not events) are skipped. A
    line that is not JSON, or an event that breaks its contract, is skipped too -- unless `experiment`
    is given: then it raises CorruptState naming the file and the line."""
    lines, end = read_lines(path, offset)
    where = (lambda n: f"line {n}") if offset == 0 else (lambda n: f"line {n} after byte {offset}")
    return parse_events(lines, path, experiment, where), end


def parse_events(lines: Iterable[str], path: Path, experiment: Optional[str] = None,
                 where: Callable[[int], str] = lambda n: f"line {n}") -> list:
    """The events of metrics lines (see read_events); `where(n)` names the n-th line in an error."""
    from dlmctl.spec.contracts import EVENT_TYPES, parse_event

    events = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = _BROKEN
        event = parse_event(record)
        if event is not None:
            events.append(event)
        elif experiment is not None and (record is _BROKEN or (isinstance(record, dict) and record.get("event") in EVENT_TYPES)):
            what = "is not valid JSON" if record is _BROKEN else f"is not a valid {record['event']!r} event"
            raise corrupt(experiment, path, f"{where(number)} {what}: {line[:80]!r}")
    return events


def newest_checkpoint_step(metrics: Path) -> Optional[int]:
    """The step of a run's newest checkpoint, from its metrics events (damaged lines skipped)."""
    from dlmctl.spec.contracts import fold_progress

    return fold_progress(read_events(metrics)[0]).last_checkpoint_step


@dataclass
class _Followed:
    inode: int
    offset: int = 0  # the end of the complete lines folded so far
    lines: int = 0  # how many
    first_line: bytes = b""  # the file's first line and the one ending at `offset`: if either changed,
    last_line: bytes = b""  # the file was rewritten (a resumed run cuts it back to its checkpoint)
    progress: "RunProgress" = None


class ProgressFollower:
    """Follows the metrics files of runs for `get --wait`: each read folds only the complete lines appended
    since the last one into the run's progress. A file replaced, cut back or rewritten (a resumed run drops
    the events past its checkpoint) is folded again from its start."""

    def __init__(self):
        self._followed: dict[Path, _Followed] = {}

    def read(self, path: Path, experiment: Optional[str] = None) -> "RunProgress":
        """The run's progress (never changed afterwards: do not change it); with `experiment`, a damaged
        line raises CorruptState naming the file and the line, as read_events does."""
        from dlmctl.spec.contracts import RunProgress, fold_progress

        try:
            f = open(path, "rb")
        except FileNotFoundError:
            self._followed.pop(path, None)
            return RunProgress()
        with f:
            stat = os.fstat(f.fileno())
            state = self._followed.get(path)
            if state is None or not _unchanged(f, stat, state):
                state = _Followed(inode=stat.st_ino, progress=RunProgress())
            f.seek(state.offset)
            data = f.read(stat.st_size - state.offset) if stat.st_size > state.offset else b""
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        if end:
            raw = data[:end].splitlines()
            before = state.lines
            lines = [line.decode("utf-8", errors="replace") for line in raw]
            events = parse_events(lines, path, experiment, lambda n: f"line {before + n}")
            progress = state.progress.model_copy(update={"evals": list(state.progress.evals)})  # no list shared
            state = _Followed(inode=state.inode, offset=state.offset + end, lines=before + len(raw),
                              first_line=state.first_line or raw[0] + b"\n", last_line=raw[-1] + b"\n",
                              progress=fold_progress(events, progress))
        self._followed[path] = state
        return state.progress


def _unchanged(f: BinaryIO, stat: os.stat_result, state: _Followed) -> bool:
    """Whether the file still begins with what was folded: the same file, no shorter, and the same first
    line and line before the offset (two short reads, not the whole file)."""
    if stat.st_ino != state.inode or stat.st_size < state.offset:
        return False
    for start, expected in ((0, state.first_line), (state.offset - len(state.last_line), state.last_line)):
        if expected:
            f.seek(start)
            if f.read(len(expected)) != expected:
                return False
    return True


_BROKEN = object()


# ---- processes ------------------------------------------------------------------------------------

_boot_id: Optional[str] = None


def process_start(pid: Optional[int]) -> Optional[str]:
    """What identifies a process with its pid over its whole life, or None when no live process has the
    pid: on Linux the boot and the clock tick it started at (unaffected by clock changes), elsewhere
    psutil's creation time."""
    global _boot_id
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        if fields[0] in ("Z", "X"):
            return None
        if _boot_id is None:
            _boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{_boot_id}:{fields[19]}"
    except (FileNotFoundError, ProcessLookupError):
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, IndexError):
        pass
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{process.create_time():.3f}"
    except psutil.Error:
        return None


def identity(pid: int) -> dict[str, Any]:
    """The record that finds this process again (`find_process`): its pid and its start."""
    return {"pid": pid, "started": process_start(pid)}


def find_process(record: Any, cmdline: Optional[str] = None) -> Optional["psutil.Process"]:
    """The live process a record (`identity`: pid and start) names, or None: a pid now used by another
    process is not it. A record from before starts were recorded names its process only if that
    process's command line contains `cmdline`. Later signals through the returned object are checked
    against pid reuse too (psutil)."""
    import psutil

    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    pid, started = record["pid"], record.get("started")
    try:
        if started:
            return psutil.Process(pid) if process_start(pid) == started else None
        if cmdline and process_start(pid) is not None:
            process = psutil.Process(pid)
            return process if cmdline in " ".join(process.cmdline()) else None
    except psutil.Error:
        pass
    return None


def alive(record: Any) -> bool:
    return find_process(record) is not None


def experiment_processes(experiment: str, run: Optional[str] = None,
                         generation: Optional[str] = None) -> list["psutil.Process"]:
    """Every live process that carries `experiment` (an ExperimentDir.key) in its environment, optionally
    only those of one run or one submission generation. Works whoever their parent is now."""
    import psutil

    wanted = {EXPERIMENT_ENV: experiment, RUN_ENV: run, GENERATION_ENV: generation}
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            env = process.environ()
        except (psutil.Error, OSError):
            continue
        if all(value is None or env.get(key) == value for key, value in wanted.items()):
            found.append(process)
    return found


def terminate(processes: Iterable["psutil.Process"], grace: float) -> None:
    """SIGTERM each process (a trainer checkpoints where it is), SIGKILL what is left after `grace`
    seconds. Never a reused pid (psutil checks)."""
    import psutil

    processes = [p for p in processes if p.pid != os.getpid()]
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    left = wait_gone(processes, grace)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGKILL)
    wait_gone(left, 10)


def wait_gone(processes: Iterable["psutil.Process"], timeout: float) -> list["psutil.Process"]:
    """Wait until the processes have exited (a zombie counts as exited: its parent may never reap it);
    returns those still running. Never reaps anything (a child's exit code stays with its Popen)."""
    left = list(processes)
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in left if running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def running(process: "psutil.Process") -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pid_alive(pid: Optional[int]) -> bool:
    """True while some process (not a zombie) has this pid -- whichever process it is. Tests use it for
    processes they have just seen; dlmctl itself identifies processes with `find_process`."""
    return process_start(pid) is not None


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


# ---- locks ----------------------------------------------------------------------------------------


class LockBusy(Exception):
    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def held_lock(path: Path, purpose: str, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on `path` (flock: released by the kernel when its holder dies, however it
    dies). Waits up to `wait` seconds, then raises LockBusy with what the holder wrote into the file."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({purpose})".encode(), 0)
        yield
    finally:
        os.close(fd)


def experiment_lock(name: str, purpose: str, wait: float = 0.0):
    """Held by every command that changes experiment `name` (submit, cancel, the watchdog's verdict)."""
    return held_lock(home() / "locks" / f"{name}.lock", purpose, wait)


def iter_experiment_dirs() -> Iterator[ExperimentDir]:
    root = experiments_dir()
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.is_dir() and not path.name.startswith(".") and (path / "experiment.yaml").is_file():
            yield ExperimentDir(path)
