"""A circuit breaker, so a dead Redis costs one timeout per cool-down, not per request.

closed     every call goes to Redis; ``threshold`` failures in a row open it.
open       no call goes to Redis (the cache is bypassed) until ``cooldown``
           seconds have passed since it opened.
half-open  exactly one probe call is let through; success closes the breaker,
           failure opens it for another cool-down.

``clock`` is the cache's own clock (``Cache(clock=...)``), so the tests that move
it also move the cool-down. That is a wall clock, which NTP may step back: a
clock found earlier than the opening time ends the cool-down (one early probe)
instead of stretching it until the clock catches up, maybe hours of bypassed cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"breaker_threshold must be at least 1, got {threshold!r}")
        if cooldown < 0:
            raise ValueError(f"breaker_cooldown must not be negative, got {cooldown!r}")
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        elapsed = self._clock() - self._opened_at
        if self._probing or not 0 <= elapsed < self.cooldown:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._probing = False

    def abandon(self) -> None:
        """A call was cancelled before it could tell: let the next one probe."""
        self._probing = False
