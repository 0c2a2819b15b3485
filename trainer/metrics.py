"""Training metrics: a Prometheus exposition server on rank 0 and the same values in `metrics.jsonl`."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LABELS = ("experiment", "run", "objective")

# Dense bf16 peak FLOP/s per device, for MFU; override with DLMCTL_PEAK_FLOPS.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device) -> Optional[float]:
    if os.environ.get("DLMCTL_PEAK_FLOPS"):
        return float(os.environ["DLMCTL_PEAK_FLOPS"])
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class TrainMetrics:
    """One object per run. Gauges/counters follow Prometheus naming: base units, `_total` counters."""

    def __init__(self, experiment: str, run: str, objective: str, jsonl_path: Optional[Path], port: int = 0,
                 registry: Optional[CollectorRegistry] = None, serve: bool = True):
        self.registry = registry or CollectorRegistry()
        self.labels = dict(experiment=experiment, run=run, objective=objective)
        self.jsonl_path = jsonl_path
        r = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, LABELS, registry=r).labels(**self.labels)

        def counter(name, doc):
            return Counter(name, doc, LABELS, registry=r).labels(**self.labels)

        self.steps = counter("dlm_train_steps", "Optimizer steps completed")
        self.tokens = counter("dlm_train_tokens", "Training tokens processed")
        self.loss = gauge("dlm_train_loss", "Training loss (nats per token) of the last step")
        self.val_loss = gauge("dlm_train_validation_loss", "Validation loss (AR NLL or DLM ELBO, nats per token)")
        self.epoch = gauge("dlm_train_epoch", "Passes over the unique training tokens")
        self.lr = gauge("dlm_train_learning_rate", "Learning rate")
        self.tokens_per_second = gauge("dlm_train_tokens_per_second", "Training throughput")
        self.mfu = gauge("dlm_train_mfu_ratio", "Model FLOPs utilisation (0-1)")
        self.accuracy = gauge("dlm_train_eval_accuracy_ratio", "Continuation-choice accuracy (0-1)")
        self.step_seconds = Histogram(
            "dlm_train_step_duration_seconds", "Wall time of one optimizer step", LABELS, registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        ).labels(**self.labels)
        if serve and port:
            start_http_server(port, addr=os.environ.get("DLMCTL_METRICS_ADDR", "0.0.0.0"), registry=r)

    def train_step(self, *, step, total_steps, epoch, tokens, step_tokens, loss, lr, step_seconds, tokens_per_second,
                   mfu=None, log=True):
        self.steps.inc()
        self.tokens.inc(step_tokens)
        self.loss.set(loss)
        self.epoch.set(epoch)
        self.lr.set(lr)
        self.tokens_per_second.set(tokens_per_second)
        self.step_seconds.observe(step_seconds)
        if mfu is not None:
            self.mfu.set(mfu)
        if log:
            self.write("train", step=step, total_steps=total_steps, epoch=epoch, tokens=tokens, train_loss=loss,
                       lr=lr, tokens_per_second=tokens_per_second, mfu=mfu)

    def evaluation(self, *, step, total_steps, epoch, tokens, val_loss, val_loss_stderr, choice_accuracy=None):
        self.val_loss.set(val_loss)
        if choice_accuracy is not None:
            self.accuracy.set(choice_accuracy)
        self.write("eval", step=step, total_steps=total_steps, epoch=epoch, tokens=tokens, val_loss=val_loss,
                   val_loss_stderr=val_loss_stderr, choice_accuracy=choice_accuracy)

    def write(self, event: str, **fields: Any) -> None:
        if self.jsonl_path is None:
            return
        record = {"event": event, "time": time.time(), **{k: _clean(v) for k, v in fields.items() if v is not None}}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
