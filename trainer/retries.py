"""Retrying a store request (tenacity): transient errors are retried with exponential backoff and jitter
until the policy's deadline; permanent ones are raised at once."""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import tenacity

from .store_errors import RetryDeadlinePassed, UploadAbandoned, describe, is_transient

log = logging.getLogger("dlmctl.checkpoints")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: the n-th retry waits between d/2 and d, d = min(max_delay,
    first_delay * 2**n). One operation gives up after `give_up_after` seconds of failing (None: never)."""

    first_delay: float = 0.5
    max_delay: float = 30.0
    give_up_after: Optional[float] = 3600.0

    def delay(self, retry: int) -> float:
        d = min(self.max_delay, self.first_delay * (2 ** min(retry, 30)))
        return d / 2 + random.random() * d / 2


def retry_call(fn: Callable[[], T], *, what: str, policy: RetryPolicy, on_retry: Callable[[], None] = lambda: None,
               abort: Optional[threading.Event] = None,
               on_failure: Optional[Callable[[BaseException], None]] = None,
               on_success: Optional[Callable[[], None]] = None) -> T:
    """Call `fn` until it succeeds, a permanent error (raised as is), or the policy gives up
    (RetryDeadlinePassed; UploadAbandoned once `abort` is set). `on_failure(exc)` is told of each
    transient failure, `on_success()` of the success."""
    outage = {}  # since the first failure: its monotonic and wall-clock time, and how long it has lasted

    def failed(state: tenacity.RetryCallState) -> None:
        if on_failure is not None:
            on_failure(state.outcome.exception())
        now = time.monotonic()
        outage.setdefault("since", (now, time.time()))
        outage["failing_for"] = now - outage["since"][0]

    def aborted() -> bool:
        return abort is not None and abort.is_set()

    def gives_up(_state=None) -> bool:
        return aborted() or (policy.give_up_after is not None and outage["failing_for"] >= policy.give_up_after)

    def delay(state: tenacity.RetryCallState) -> float:
        if gives_up():
            return 0.0
        seconds = policy.delay(state.attempt_number - 1)
        if policy.give_up_after is not None:  # the last attempt lands on the deadline, not long after it
            seconds = max(0.0, min(seconds, policy.give_up_after - outage["failing_for"]))
        return seconds

    def before_sleep(state: tenacity.RetryCallState) -> None:
        retry = state.attempt_number
        on_retry()
        level = logging.WARNING if retry & (retry - 1) == 0 else logging.DEBUG  # 1st, 2nd, 4th, 8th ... retry
        log.log(level, "%s failed (%s); retry %d in %.1fs", what, describe(state.outcome.exception()), retry,
                state.next_action.sleep)

    def give_up(state: tenacity.RetryCallState):
        exc, attempts, failing_for = state.outcome.exception(), state.attempt_number, outage["failing_for"]
        if aborted():
            raise UploadAbandoned(f"{what}: abandoned after {attempts} attempts: {describe(exc)}") from exc
        raise RetryDeadlinePassed(f"{what}: gave up after {attempts} attempts over {failing_for:.0f}s: "
                                  f"{describe(exc)}", outage["since"][1], failing_for) from exc

    result = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient), after=failed, stop=gives_up, wait=delay,
        before_sleep=before_sleep, retry_error_callback=give_up,
        sleep=abort.wait if abort is not None else time.sleep,
    )(fn)
    if on_success is not None:
        on_success()
    return result
