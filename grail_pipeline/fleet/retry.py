"""Calls to Redis that survive an outage: back-off between attempts, one log line when it lasts, one when it ends.

A worker must not stall its GPU or drop a signed group because Redis restarted. `RedisGuard.call` retries a
call with exponential back-off for as long as the caller's patience allows (claims wait: there is nothing
to mine without an index); `RedisGuard.attempt` tries once, or not at all while the back-off has not run out,
so a caller with a fallback (the spill) moves on at once instead of hitting a dead socket per group. The
outage is logged once when it has lasted `warn_after_s` (a restart of a few hundred ms stays quiet) and once
when Redis answers again, and `outage_s` feeds the status file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)
T = TypeVar("T")
LOST = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


class RedisUnavailable(Exception):
    """Redis did not answer within the caller's patience (the last connection error is the cause)."""


class RedisGuard:
    """The one retry loop for one worker's Redis calls, with the outage's start and state for the status."""

    def __init__(self, describe: str, *, warn_after_s: float = 3.0, first_delay_s: float = 0.05,
                 max_delay_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.describe = describe
        self.warn_after_s = warn_after_s
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self._clock = clock
        self._sleep = sleep
        self._down_since: float | None = None
        self.outages = 0  # times Redis stopped answering (the metrics)
        self._failures = 0
        self._next_try = 0.0
        self._warned = False
        self._lock = threading.Lock()  # one guard serves the claim, renewal and delivery threads

    @property
    def outage_s(self) -> float | None:
        """Seconds since Redis stopped answering; None while it answers."""
        return None if self._down_since is None else self._clock() - self._down_since

    def attempt(self, op: Callable[[], T]) -> T:
        """`op()` once; raises RedisUnavailable without calling it while the back-off has not run out."""
        if self._down_since is not None and self._clock() < self._next_try:
            raise RedisUnavailable(f"{self.describe} is unreachable (retrying)")
        try:
            result = op()
        except LOST as exc:
            self._failed()
            raise RedisUnavailable(f"{self.describe} is unreachable: {exc}") from exc
        self._answered()
        return result

    def call(self, op: Callable[[], T], patience_s: float | None = None) -> T:
        """`op()`, retried with back-off on connection errors until it answers or `patience_s` has passed
        (None: forever); raises RedisUnavailable when patience runs out."""
        give_up = None if patience_s is None else self._clock() + patience_s
        while True:
            try:
                return self.attempt(op)
            except RedisUnavailable:
                now = self._clock()
                if give_up is not None and now >= give_up:
                    raise
                wait = self._next_try - now
                if give_up is not None:
                    wait = min(wait, give_up - now)
                self._sleep(max(wait, 0.0))

    def _failed(self) -> None:
        with self._lock:
            self._record_failure()

    def _record_failure(self) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
            self.outages += 1
        self._next_try = now + min(self.max_delay_s, self.first_delay_s * 2 ** min(self._failures, 20))
        self._failures += 1
        if not self._warned and now - self._down_since >= self.warn_after_s:
            self._warned = True
            log.warning("%s has not answered for %.1f s; retrying with back-off, signed groups are kept",
                        self.describe, now - self._down_since)

    def _answered(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            self._record_answer()

    def _record_answer(self) -> None:
        if self._down_since is not None and self._warned:
            log.warning("%s answers again after %.1f s", self.describe, self._clock() - self._down_since)
        self._down_since = None
        self._failures = 0
        self._warned = False
