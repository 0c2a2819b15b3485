"""Training metrics: a Prometheus exposition server on rank 0, and the same values as the typed events of
`spec.contracts` in `metrics.jsonl`, which a MetricsMirror keeps current in the run's checkpoint store.

Every line is built through the event models, and a field the model does not name is an error here, at
the writer (readers ignore unknown fields), so a renamed field breaks the writer and its readers together.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from dlmctl.spec import Run
from dlmctl.spec.contracts import EVENT_TYPES, MetricsEvent, parse_event
from dlmctl.spec.metrics import (
    CHOICE_ACCURACY, EPOCH, LEARNING_RATE, MFU, PLANNED_EPOCHS, PLANNED_STEPS, RUN_INFO, STEP_DURATION,
    STEP_PHASE_SECONDS, STEP_PHASES, TOKENS_PER_SECOND, TRAIN_LOSS, TRAIN_STEPS, TRAIN_TOKENS, TRAINER_METRICS, VALIDATION_LOSS,
    VALIDATION_LOSS_STDERR, VALIDATION_TOKENS, register, run_labels, sweep_labels,
)
from dlmctl.spec.settings import TrainerSettings, read

from .retries import retry_call
from .store_errors import describe

log = logging.getLogger("dlmctl.trainer")
URGENT_EVENTS = frozenset({"start", "eval", "checkpoint", "done"})  # uploaded at once; train events periodically

# Dense (not sparse) bf16 peak FLOP/s per device, by a part of its CUDA name, for MFU (here and in the
# benchmarks); override with DLMCTL_PEAK_FLOPS.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "B200": 2250e12, "A100": 312e12,
                   "A800": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device) -> Optional[float]:
    configured = read(TrainerSettings).peak_flops
    if configured:
        return configured
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ---- events --------------------------------------------------------------------------------------


def build_event(kind: str, *, time: Optional[float] = None, **fields: Any) -> MetricsEvent:
    """The `kind` event (start, train, eval, checkpoint, done) with `fields`, stamped now unless `time` is
    given. Non-finite floats become absent. Raises for an unknown kind or field, or a missing one."""
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"{kind!r}: not a metrics event (one of {', '.join(EVENT_TYPES)})")
    unknown = sorted(set(fields) - set(cls.model_fields))
    if unknown:
        raise TypeError(f"a {kind} event has no field {', '.join(unknown)} (spec.contracts.{cls.__name__})")
    return cls(event=kind, time=_now() if time is None else time, **{k: _clean(v) for k, v in fields.items()})


def event_line(event: MetricsEvent) -> str:
    """One metrics.jsonl line (with its newline): the event's name first, absent values left out."""
    return json.dumps({"event": event.event, **event.model_dump(mode="json", exclude_none=True)}) + "\n"


def events_until(data: bytes, step: int) -> bytes:
    """The complete lines of a metrics file, less the events past `step` (a run resuming from `step` logs
    them again) and less lines that are not JSON (a line torn by a kill). Other tools' lines are kept."""
    kept = []
    for line in data[: data.rfind(b"\n") + 1].splitlines(keepends=True):
        record = _json_or_none(line)
        if record is None:
            continue
        event = parse_event(record)
        if event is None or event.step <= step:
            kept.append(line)
    return b"".join(kept)


def last_step(data: bytes) -> int:
    """The highest step any event of a metrics file names (-1 for none)."""
    steps = [e.step for e in (parse_event(_json_or_none(line)) for line in data.splitlines()) if e is not None]
    return max(steps, default=-1)


def _json_or_none(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _now() -> float:
    return time.time()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ---- Prometheus and metrics.jsonl -----------------------------------------------------------------


class TrainMetrics:
    """One object per run: the series of `spec.metrics.TRAINER_METRICS`, labelled with the run's
    `RUN_LABELS`, set from exactly the values the events carry. Events are appended to `jsonl_path` (None:
    not written, as on ranks other than 0); `on_event(kind)` is called after each one is written. Safe to
    call from several threads (checkpoint events arrive on the store's uploader thread).

    The step and token counters hold the run's totals, as the events do: a resumed run starts them at the
    checkpoint's values (Prometheus sees a counter reset, as after any restart)."""

    def __init__(self, run: Run, jsonl_path: Optional[Path], port: int = 0, registry=None, serve: bool = True,
                 on_event: Optional[Callable[[str], None]] = None):
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = registry or CollectorRegistry()
        self.labels = run_labels(run)
        self.jsonl_path = jsonl_path
        self.on_event = on_event
        self._lock = threading.Lock()
        series = {m: register(m, self.registry).labels(**self.labels) for m in TRAINER_METRICS
                  if m not in (RUN_INFO, STEP_PHASE_SECONDS)}
        self.steps, self.planned_steps = series[TRAIN_STEPS], series[PLANNED_STEPS]
        self.tokens, self.epoch, self.planned_epochs = series[TRAIN_TOKENS], series[EPOCH], series[PLANNED_EPOCHS]
        self.loss, self.lr = series[TRAIN_LOSS], series[LEARNING_RATE]
        self.tokens_per_second, self.mfu = series[TOKENS_PER_SECOND], series[MFU]
        self.step_seconds = series[STEP_DURATION]
        self.val_loss, self.val_loss_stderr = series[VALIDATION_LOSS], series[VALIDATION_LOSS_STDERR]
        self.val_tokens, self.accuracy = series[VALIDATION_TOKENS], series[CHOICE_ACCURACY]
        for unmeasured in (self.loss, self.lr, self.tokens_per_second, self.mfu, self.val_loss, self.val_loss_stderr,
                           self.val_tokens, self.accuracy):
            unmeasured.set(math.nan)  # until first measured: a 0 would be plotted as a value
        phases = register(STEP_PHASE_SECONDS, self.registry)
        self.phase_seconds = {phase: phases.labels(**self.labels, phase=phase) for phase in STEP_PHASES}
        sweep = sweep_labels(run.point)
        register(RUN_INFO, self.registry, tuple(sweep)).labels(**self.labels, **sweep).set(1)
        self._steps_counted, self._tokens_counted = 0, 0
        if serve and port:
            start_http_server(port, addr=read(TrainerSettings).metrics_addr, registry=self.registry)

    def started(self, *, step, total_steps, tokens, planned_epochs, world_size, parameters, unigram_entropy=None):
        """The run (re)starts at `step`, having seen `tokens`; it will take `total_steps` steps in all."""
        self.planned_steps.set(total_steps)
        self.planned_epochs.set(planned_epochs)
        self._count(step, tokens)
        self.write("start", step=step, total_steps=total_steps, world_size=world_size, parameters=parameters,
                   unigram_entropy=unigram_entropy)

    def train_step(self, *, step, total_steps, epoch, tokens, loss, lr, step_seconds, phase_seconds, log=True,
                   tokens_per_second=None, mfu=None):
        """One optimizer step done. `phase_seconds` ({phase: seconds}) splits its `step_seconds`; a step that
        logs (`log`) also gives the throughput and MFU of the interval since the last one that did."""
        self._count(step, tokens)
        self.loss.set(loss)
        self.epoch.set(epoch)
        self.lr.set(lr)
        self.step_seconds.observe(step_seconds)
        self.phase(phase_seconds)
        if tokens_per_second is not None:
            self.tokens_per_second.set(tokens_per_second)
        if mfu is not None:
            self.mfu.set(mfu)
        if log:
            self.write("train", step=step, total_steps=total_steps, epoch=epoch, tokens=tokens, train_loss=loss,
                       lr=lr, tokens_per_second=tokens_per_second, mfu=mfu)

    def phase(self, seconds: Mapping[str, float]) -> None:
        """Add wall time to phases of `spec.metrics.STEP_PHASES`."""
        for phase, value in seconds.items():
            self.phase_seconds[phase].inc(value)

    def evaluation(self, *, step, total_steps, epoch, tokens, val_loss, val_loss_stderr, val_bits_per_byte=None,
                   choice_accuracy=None, choice_accuracy_stderr=None, flops=None, train_loss=None):
        """An evaluation at `step`: the `Evaluator`'s results, the training FLOPs spent so far (`flops`) and
        the mean training loss since the previous evaluation (`train_loss`)."""
        self.val_loss.set(val_loss)
        self.val_loss_stderr.set(val_loss_stderr)
        self.val_tokens.set(tokens)
        if choice_accuracy is not None:
            self.accuracy.set(choice_accuracy)
        self.write("eval", step=step, total_steps=total_steps, epoch=epoch, tokens=tokens, val_loss=val_loss,
                   val_loss_stderr=val_loss_stderr, val_bits_per_byte=val_bits_per_byte,
                   choice_accuracy=choice_accuracy, choice_accuracy_stderr=choice_accuracy_stderr, flops=flops,
                   train_loss=train_loss)

    def checkpoint_saved(self, info) -> None:
        """A CheckpointStore's `on_saved`: the checkpoint's manifest is written, a run can resume from it."""
        self.write("checkpoint", step=info.step, epoch=info.epoch, uri=info.uri)

    def write(self, event: str, **fields: Any) -> None:
        line = event_line(build_event(event, **fields))
        if self.jsonl_path is None:
            return
        with self._lock:
            with open(self.jsonl_path, "a") as f:
                f.write(line)
        if self.on_event is not None:
            self.on_event(event)

    def snapshot(self, dest: Path) -> None:
        """Copy the events written so far to `dest` (never a line half-written by another thread)."""
        if self.jsonl_path is None:
            return
        with self._lock:
            data = self.jsonl_path.read_bytes() if self.jsonl_path.exists() else b""
        dest.write_bytes(data)

    def _count(self, step: int, tokens: int) -> None:
        self.steps.inc(max(0, step - self._steps_counted))
        self.tokens.inc(max(0, tokens - self._tokens_counted))
        self._steps_counted, self._tokens_counted = max(step, self._steps_counted), max(tokens, self._tokens_counted)


# ---- the copy in the store ----------------------------------------------------------------------


class MetricsMirror:
    """Keeps `<store>/<name>` (metrics.jsonl) a copy of the local file `local`, and puts `once` files
    ({name: bytes}) there once, all from one background thread.

    `changed(urgent)` after each write never blocks training: it only notes that the store is behind.
    The thread uploads the whole file (complete lines only) when an urgent change or a flush asks for it,
    and at most every `interval` seconds for the others. One upload at a time; changes made meanwhile
    are coalesced into the next one, which reads the file afresh (latest wins). Failures are retried with
    the store's policy, then logged and tried again after `interval` (or at a flush). `flush(timeout)`
    waits until the store has everything written before the call."""

    def __init__(self, local: Path, location, *, retry, name: str, interval: float = 15.0,
                 once: Optional[Mapping[str, bytes]] = None):
        self.local, self.location, self.retry, self.name, self.interval = Path(local), location, retry, name, interval
        self._cond = threading.Condition()
        self._written = 1  # changes noted so far; the file as it is now counts as one
        self._uploaded = 0  # changes the store holds
        self._due = True
        self._last_attempt = -math.inf
        self._retry_at = -math.inf  # after a failed upload: not before this
        self._once = dict(once or {})
        self._closed = False
        self._abort = threading.Event()
        self.uploads = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="metrics-mirror", daemon=True)
        self._thread.start()

    def changed(self, urgent: bool = False) -> None:
        with self._cond:
            self._written += 1
            self._due = self._due or urgent
            if urgent or self._written == self._uploaded + 1:  # else the thread is already timed to wake
                self._cond.notify_all()

    def event_written(self, kind: str) -> None:
        """A TrainMetrics `on_event`."""
        self.changed(urgent=kind in URGENT_EVENTS)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Upload what was written before this call now, and wait for it. False on timeout or failure."""
        with self._cond:
            target = self._written
            self._due = True
            self._retry_at = -math.inf
            self._cond.notify_all()
            return self._cond.wait_for(lambda: (self._uploaded >= target and not self._once) or self._closed,
                                       timeout) and self._uploaded >= target

    def close(self, timeout: Optional[float] = None) -> bool:
        """flush(timeout), then stop the thread (an upload still retrying is abandoned)."""
        done = self.flush(timeout)
        self._abort.set()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(None if done else 5.0)
        return done

    def _next_upload(self) -> Optional[float]:
        """When (monotonic) the thread should upload next; None while the store holds everything."""
        if not self._once and self._uploaded >= self._written:
            return None
        soon = self._last_attempt if (self._once or self._due) else self._last_attempt + self.interval
        return max(soon, self._retry_at)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    at = self._next_upload()
                    if at is not None and at <= time.monotonic():
                        break
                    self._cond.wait(None if at is None else max(0.01, at - time.monotonic()))
                if self._closed:
                    return
                target, once = self._written, self._once
                self._once, self._due = {}, False
                self._last_attempt = time.monotonic()
            try:
                while once:
                    name = next(iter(once))
                    self._put(name, once[name])
                    del once[name]
                if self._uploaded < target:
                    self._put(self.name, self._complete_lines())
            except Exception as exc:  # retried already; try again after `interval`, or at the next flush
                self.failures += 1
                log.warning("run files not updated at %s: %s", self.location, describe(exc))
                with self._cond:
                    self._once = {**once, **self._once}
                    self._retry_at = time.monotonic() + self.interval
                    self._cond.notify_all()
                continue
            with self._cond:
                self._uploaded = max(self._uploaded, target)
                self.uploads += 1
                self._cond.notify_all()

    def _complete_lines(self) -> bytes:
        try:
            data = self.local.read_bytes()
        except FileNotFoundError:
            return b""
        return data[: data.rfind(b"\n") + 1]

    def _put(self, name: str, data: bytes) -> None:
        loc = self.location
        retry_call(lambda: loc.write_bytes(loc.path(name), data), what=f"uploading {name}", policy=self.retry,
                   abort=self._abort)
