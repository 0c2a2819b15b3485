"""Where an optimizer step's wall time goes, by the phases of `spec.metrics.STEP_PHASES` (the checkpoint
stall is timed around the save, outside the step).

On CUDA the host runs ahead of the device, so timing a phase on the host alone would credit its device
work to whichever later call waits for it. The loop already waits for the device once per step (it reads
the step's loss with float()), so the phase boundaries add no synchronisation of their own, which would
cost the overlap of the host's kernel launches with the device's work: a CUDA event is recorded at each
boundary (no wait) and read after the step's own wait. A boundary is passed once both the host and the
device have passed it, and each phase gets the time from the previous boundary to its own; the phases sum
to the step's wall time. The device is idle when a step starts (the previous one ended with that wait), so
an event recorded then marks the step's start on the device's clock.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from dlmctl.spec.metrics import STEP_PHASES

IN_STEP = STEP_PHASES[:3]  # data, forward_backward, optimizer
CLOSING = "optimizer"  # the time after the last boundary: the step's closing collectives (loss mean, stop flag)


class StepClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._began = 0.0
        self._origin: Optional[torch.cuda.Event] = None
        self._marks: list[tuple[str, float, Optional[torch.cuda.Event]]] = []

    def start(self) -> None:
        self._marks = []
        self._origin = self._event()
        self._began = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The host has finished issuing `phase` (its device work may still run)."""
        self._marks.append((phase, time.perf_counter(), self._event()))

    def stop(self) -> tuple[float, dict[str, float]]:
        """After the step's own wait for the device: its wall time, and {phase: seconds}, which sum to it."""
        end = time.perf_counter()
        seconds = dict.fromkeys(IN_STEP, 0.0)
        passed = self._began
        for phase, host, event in self._marks:
            done = host
            if event is not None:
                event.synchronize()  # already complete after the step's wait: returns at once
                done = max(host, self._began + self._origin.elapsed_time(event) / 1000)
            done = min(end, max(passed, done))
            seconds[phase] += done - passed
            passed = done
        seconds[CLOSING] += end - passed
        return end - self._began, seconds

    def _event(self) -> Optional[torch.cuda.Event]:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
