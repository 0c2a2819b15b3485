"""The training loop: one run, one arm, from its last verified checkpoint to the end."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dlmctl.spec import Run
from dlmctl.spec.contracts import METRICS_FILE
from dlmctl.spec.sections import Arm
from dlmctl.spec.settings import TrainerSettings, read

from . import training_state
from .data import prepare_data
from .engine import World, build_engine, compiles, init_distributed
from .evaluate import Evaluator
from .export import unexportable
from .metrics import TrainMetrics, peak_flops
from .objectives import objective_loss
from .phases import StepClock
from .runs import build_model, export_final
from .store_errors import CheckpointError, is_user_error, reason

log = logging.getLogger("dlmctl.trainer")


def train(run: Run, output: Path) -> int:
    """Train `run` to its end; 0 when done, 143 when stopped by SIGTERM after a checkpoint. RunFailed
    (see training_state) when it cannot go on: after the store's background threads are stopped, so the
    error is the run's last line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    world = init_distributed()
    held = _Held()
    try:
        return _train(run, output, world, held)
    except training_state.RunFailed:
        held.abandon()
        raise


class _Held:
    """The run's background uploaders, for a failure to stop: at once if the store itself failed, else
    after a short grace so what was already saved reaches the store."""

    store = None
    mirror = None

    def abandon(self) -> None:
        grace = 0.0 if self.store is None or self.store.failure is not None else read(TrainerSettings).flush_after_signal_seconds
        deadline = time.monotonic() + grace
        if self.store is not None:
            self.store.close(timeout=grace)
        if self.mirror is not None:
            self.mirror.close(timeout=max(0.0, deadline - time.monotonic()))


def _train(run: Run, output: Path, world: World, held: _Held) -> int:
    spec = run.spec
    if spec.global_batch_sequences % (spec.batch.micro_batch_sequences * world.world_size):
        raise training_state.RunFailed(
            f"spec.batch: {spec.global_batch_sequences} sequences do not divide over {world.world_size} processes "
            f"x {spec.batch.micro_batch_sequences} per micro-batch")
    output.mkdir(parents=True, exist_ok=True)
    stop = _StopFlag()
    metrics = TrainMetrics(run, output / METRICS_FILE if world.is_main else None,
                           port=spec.metrics.port if world.is_main else 0)
    store = held.store = training_state.open_store(run, output, world, on_saved=metrics.checkpoint_saved,
                                                   registry=metrics.registry)
    training_state.preflight(store, run, world)  # before anything slow: a wrong credential fails in seconds

    data = _prepare_data_once(run, output, world)
    model = build_model(run, data.tokenizer.vocab_size)
    total_steps = spec.total_steps
    engine, scheduler = build_engine(model, spec, world, total_steps)
    batches = data.train_batches()
    training_state.check_staging_is_reachable(engine, world)
    resumed = training_state.resume(store, engine, batches, world, run, output)
    start_step = resumed.step

    evaluator = Evaluator(run, data)
    tokens_per_step = spec.global_batch_sequences * spec.data.seq_len
    mirror = None
    if world.is_main:
        (output / "data.json").write_text(json.dumps(data.metadata, indent=2))
        data.tokenizer.save(output / "tokenizer.json")
        training_state.restore_metrics(store, output / METRICS_FILE, resumed)
        mirror = held.mirror = training_state.mirror_run(store, run, output)
        metrics.on_event = mirror.event_written
        log.info("run %s: %s arm, %s parameters, %d steps of %d sequences x %d tokens, world size %d, resuming at %d",
                 run.name, run.arm.value, f"{model.num_params():,}", total_steps, spec.global_batch_sequences,
                 spec.data.seq_len, world.world_size, start_step)
        metrics.started(step=start_step, total_steps=total_steps, tokens=start_step * tokens_per_step,
                        planned_epochs=batches.epoch_at(total_steps * spec.global_batch_sequences),
                        world_size=world.world_size, parameters=model.num_params(),
                        unigram_entropy=data.metadata.get("unigram_entropy"))

    accumulation = spec.accumulation(world.world_size)
    peak = peak_flops(world.device)
    flops_per_token = model.flops_per_token(spec.data.seq_len, causal=run.arm is Arm.autoregressive)
    clock = StepClock(world.device)
    interval_steps, interval_seconds = 0, 0.0  # since the last step that logged: its throughput
    since_eval = _LossMean(*resumed.loop_state.get("since_eval", (0.0, 0)))  # saved with each checkpoint
    step = start_step
    stop_now = False
    first_step_seconds = None  # with torch.compile: the first step compiles; the second tells how long that took
    while step < total_steps and not stop_now:
        clock.start()
        train_loss, aux_loss = _train_step(run, engine, batches, data.tokenizer.mask_id, step, accumulation, world,
                                           clock)
        since_eval.add(train_loss)
        step += 1
        stop_now, failure = _stop_or_failure(stop.requested, store, world)
        if failure:  # a permanent store error, or an outage past the retry deadline: training on saves nothing
            raise failure
        elapsed, phase_seconds = clock.stop()
        if compiles(spec, world) and world.is_main and step - start_step <= 2:
            if first_step_seconds is None:
                first_step_seconds = elapsed
            else:
                log.info("torch.compile: first step %.1f s, second %.2f s: about %.1f s compiling", first_step_seconds,
                         elapsed, first_step_seconds - elapsed)
        interval_steps, interval_seconds = interval_steps + 1, interval_seconds + elapsed
        log_now = step % spec.metrics.log_interval_steps == 0 or step == total_steps
        if world.is_main:
            lr = scheduler.get_last_lr()[0]
            throughput = interval_steps * tokens_per_step / interval_seconds if log_now else None
            metrics.train_step(step=step, total_steps=total_steps, epoch=batches.epoch_at(),
                               tokens=step * tokens_per_step, loss=train_loss, lr=lr, step_seconds=elapsed,
                               phase_seconds=phase_seconds, log=log_now, tokens_per_second=throughput,
                               mfu=flops_per_token * throughput / peak if peak and log_now else None)
            if log_now:
                log.info("step %d/%d epoch %.2f loss %.4f lr %.2e %.0f tok/s%s", step, total_steps,
                         batches.epoch_at(), train_loss, lr, throughput,
                         f" auxiliary loss {aux_loss:.4g}" if model.shape.variant != "dense" else "")
        if log_now:
            interval_steps, interval_seconds = 0, 0.0
        if step % spec.eval.interval_steps == 0 or step == total_steps:
            _evaluate(evaluator, engine, metrics, step, total_steps, batches, spec, world,
                      flops=flops_per_token * step * tokens_per_step, train_loss=since_eval.take())
        if step % spec.checkpoint.interval_steps == 0 or step == total_steps or stop_now:
            began = time.perf_counter()
            training_state.save(store, engine, batches, step, world, metrics if world.is_main else None,
                                loop_state={"since_eval": (since_eval.total, since_eval.count)})
            metrics.phase({"checkpoint_stall": time.perf_counter() - began})

    # A preempted pod has a grace period; a finished run waits for its last upload as long as the store
    # may be retried. The metrics file goes last (it holds the checkpoint events) and keeps a share of the
    # time for itself.
    settings = read(TrainerSettings)
    budget = (settings.flush_after_signal_seconds if stop_now
              else max(settings.flush_at_end_seconds, training_state.retry_deadline(run) + 60))
    deadline = time.monotonic() + budget
    reserve = min(5.0, budget / 4)
    uploaded = store.flush(timeout=budget - reserve, until_failure=True) if store else True
    failure = training_state.store_failure(store, world)
    if failure:
        raise failure
    if step < total_steps:
        _close_mirror(mirror, max(0.0, deadline - time.monotonic()))
        log.warning("stopped by signal at step %d; the last checkpoint resumes it", step)
        return 143
    if world.is_main and not uploaded:
        raise training_state.RunFailed(f"checkpoint step {step} not uploaded to {store.uri} after {budget:.0f}s", 1)
    no_export = unexportable(model.shape)
    if no_export and world.is_main:
        log.warning("no export: %s", no_export)
    with _gathered_parameters(engine):
        try:
            exported = (export_final(run, engine.module, data, store, output)
                        if world.is_main and not no_export else None)
        except Exception as exc:
            if not isinstance(exc, (OSError, CheckpointError)):
                raise
            raise training_state.RunFailed(f"export to {store.uri if store else output} failed: {reason(exc)}",
                                           2 if is_user_error(exc) else 1) from None
    if world.is_main:
        metrics.write("done", export=exported, step=step, total_steps=total_steps, tokens=step * tokens_per_step,
                      epoch=batches.epoch_at())
        _close_mirror(mirror, max(reserve, deadline - time.monotonic()))
    dist.barrier()
    return 0


def _stop_or_failure(stop_requested: bool, store, world: World):
    """(stop now, RunFailed or None), the same on every rank: a signal may reach one rank first, and only
    rank 0 has the store."""
    failure = store.failure if store else None
    code = max(1 if stop_requested else 0, 0 if failure is None else 1 + failure.exit_code)
    if world.world_size > 1:
        value = torch.tensor(float(code), device=world.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        code = int(value.item())
    if code >= 2:
        return True, training_state.store_failure(store, world)
    return code == 1, None


def _close_mirror(mirror, timeout: float) -> None:
    if mirror is not None and not mirror.close(timeout):
        log.warning("%s in the checkpoint store may lag behind the local file (upload unfinished after %.0fs)",
                    METRICS_FILE, timeout)


def _train_step(run: Run, engine, batches, mask_id: int, step: int, accumulation: int, world: World,
                clock: StepClock) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches; returns the step's objective loss and the model
    variant's auxiliary loss (0 for the dense model), both averaged over all ranks (read together: the one
    wait for the device per step, see phases.StepClock). The optimizer steps on their sum."""
    spec = run.spec
    total = torch.zeros(2, dtype=torch.float64, device=world.device)  # the objective, the variant's auxiliary loss
    for micro_step in range(accumulation):
        tokens, sample_index = batches.batch(step, micro_step, world.rank, world.world_size,
                                             spec.batch.micro_batch_sequences, spec.global_batch_sequences)
        tokens = tokens.to(world.device)
        clock.mark("data")
        loss, stats = objective_loss(run.arm, engine, tokens, sample_index, step, spec.seed,
                                     spec.objective, mask_id, spec.global_batch_sequences)
        engine.backward(loss)
        aux = stats.get("aux_loss", 0.0)
        total += torch.stack([loss.detach().double() - aux, torch.as_tensor(aux, dtype=torch.float64,
                                                                             device=world.device)])
        clock.mark("forward_backward")
        engine.step()  # DeepSpeed steps the optimizer at the last micro-batch; before, it only counts them
        clock.mark("optimizer")
    batches.step_done(step, spec.global_batch_sequences)
    objective, aux = _mean_over_ranks(total / accumulation, world)
    return objective, aux


def _evaluate(evaluator, engine, metrics, step, total_steps, batches, spec, world, *, flops, train_loss):
    result = evaluator.run(engine.module)
    if world.is_main:
        metrics.evaluation(step=step, total_steps=total_steps,
                           epoch=batches.epoch_at(),
                           tokens=step * spec.global_batch_sequences * spec.data.seq_len, flops=flops,
                           train_loss=train_loss, **result)
        log.info("eval step %d: validation loss %.4f ± %.4f (%.4f bits/byte), choice accuracy %s", step,
                 result["val_loss"], result["val_loss_stderr"], result.get("val_bits_per_byte", math.nan),
                 result.get("choice_accuracy"))


class _LossMean:
    """Mean of the step losses added since the last `take()` (None when there were none)."""

    def __init__(self, total: float = 0.0, count: int = 0):
        self.total, self.count = total, count

    def add(self, loss: float) -> None:
        self.total, self.count = self.total + loss, self.count + 1

    def take(self):
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean


def _prepare_data_once(run: Run, output: Path, world: World):
    cache = read(TrainerSettings).cache  # spec.data.cache wins
    if not world.is_main:
        dist.barrier()  # rank 0 tokenizes and caches; the others then read the cache
    data = prepare_data(run.spec.data, run.spec.seed, cache)
    if world.is_main:
        dist.barrier()
    return data


def _gathered_parameters(engine):
    """ZeRO-3 partitions the parameters; the export needs them whole."""
    if engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _mean_over_ranks(value: torch.Tensor, world: World):
    """float(value), or a list of floats for a vector, averaged over the ranks."""
    if world.world_size > 1:
        dist.all_reduce(value)
        value = value / world.world_size
    return value.tolist()


class _StopFlag:
    """SIGTERM (preemption, `dlmctl cancel`) finishes the current step, checkpoints and exits."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_):
        self.requested = True
