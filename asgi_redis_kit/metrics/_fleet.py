"""Fleet-wide counters in Redis: every instance adds what it counted, per minute.

Each instance's :class:`FleetFlusher` wakes every ``interval`` seconds, takes a
snapshot of its counters (``Metrics.counts()``: plain ints, copied in one
go, per stats object), and adds the difference from the previous snapshot
into the hash of the current minute::

    {ark:m:}:29481234   (epoch minute)   field "cache_lookups.hit|web-1" -> 1234

One hash per minute, one field per (counter, instance), kept ``keep_minutes``
by its TTL: the size depends on the number of instances and counter names
(closed sets), never on the traffic. Every key carries the prefix as its hash
tag, so on Cluster a flush and a read are one slot each. A flush is a probe
(EXISTS of the hash) and one round trip, sent from the flusher's own task and
bounded by ``timeout``: a request never waits on it. When Redis does not
answer the probe, nothing was sent and the next flush sends it along; when it
stops answering the increments themselves, that interval's difference is
dropped (never re-sent: a write that timed out may have landed). So an outage
loses at most one interval, and an instance that dies simply stops adding.
``_flushes`` counts each instance's flushes, so an idle instance still shows up.

:func:`fleet_stats` reads the last minutes back: totals and a row per instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from .._redis import Backend, RedisLike
from ..errors import BackendUnavailable
from ._hub import Metrics

logger = logging.getLogger("asgi_redis_kit.metrics")

DEFAULT_PREFIX = "ark:m:"
HEARTBEAT = "_flushes"


def bucket_key(prefix: str, minute: int) -> str:
    return f"{{{prefix}}}:{minute}"


def _check_prefix(prefix: str) -> None:
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError(
            f"key_prefix must be non-empty and hold no braces (it is the keys' hash tag), "
            f"got {prefix!r}"
        )


def _check_minutes(name: str, value: object, most: int | None = None) -> int:
    """A whole number of minutes, at least 1 (and at most ``most``): a fraction
    would reach Redis as a TTL or a bucket it refuses or never wrote."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} is a whole number of minutes, got {value!r}")
    if value < 1 or (most is not None and value > most):
        limit = "at least 1" if most is None else f"from 1 to {most} (a week)"
        raise ValueError(f"{name} must be {limit}, got {value!r}")
    return int(value)


def _backend(redis: RedisLike | Backend, timeout: float) -> Backend:
    if isinstance(redis, Backend):
        return redis
    backend = Backend(redis, timeout=timeout, max_connections=2)
    backend.label = "fleet"
    return backend


class FleetFlusher:
    """Adds this instance's counter increments to the fleet's per-minute hashes.

    Start it with the app and stop it at shutdown (it flushes once more)::

        @asynccontextmanager
        async def lifespan(app):
            async with FleetFlusher(metrics, redis_url, instance="web-1"):
                yield

    Parameters:
        metrics: what to count (:class:`Metrics`).
        redis: a URL or a ready client (never closed by us), or a Backend.
        instance: this instance's name in the fleet (default ``host:pid``);
            unique per running process, and from a small set: it is a field name.
        interval: seconds between flushes; what an outage can lose at most.
        key_prefix: prefix (and Cluster hash tag) of the fleet's keys.
        keep_minutes: how long a minute's hash lives.
        timeout: deadline of one flush's round trip.
        clock: wall-clock seconds: instances agree on minutes through it.

    ``flushes`` and ``failures`` count the flushes that reached Redis and not.
    """

    def __init__(
        self,
        metrics: Metrics,
        redis: RedisLike | Backend,
        *,
        instance: str | None = None,
        interval: float = 5.0,
        key_prefix: str = DEFAULT_PREFIX,
        keep_minutes: int = 60,
        timeout: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_prefix(key_prefix)
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        keep_minutes = _check_minutes("keep_minutes", keep_minutes)
        self.metrics = metrics
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        if "|" in self.instance:
            raise ValueError(f"instance must not contain '|', got {self.instance!r}")
        self.interval = interval
        self.key_prefix = key_prefix
        self.ttl = keep_minutes * 60 + 60
        self.clock = clock
        self.backend = _backend(redis, timeout)
        self.flushes = self.failures = 0
        self._sent: dict[tuple[int, str], int] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def __repr__(self) -> str:
        return f"<FleetFlusher instance={self.instance!r} every {self.interval}s>"

    def _deltas(self) -> dict[str, int]:
        """What changed since the last snapshot, and that snapshot taken: one
        synchronous step, so two flushes never send the same increment."""
        now = self.metrics.counts()
        previous, self._sent = self._sent, now
        deltas: dict[str, int] = {}
        for (source, name), value in now.items():
            before = previous.get((source, name), 0)
            # Lower than before: that source's stats were reset; count from zero again.
            delta = value - before if value >= before else value
            if delta:
                deltas[name] = deltas.get(name, 0) + delta
        return deltas

    async def flush(self) -> bool:
        """Send the increments since the last flush; False (nothing raised) when
        Redis did not answer: they are dropped, see the module docstring."""
        key = bucket_key(self.key_prefix, int(self.clock() // 60))
        previous = self._sent
        deltas = self._deltas()
        suffix = "|" + self.instance
        sending = False
        try:
            async with self.backend.call("fleet_flush") as client:
                # Until Redis answers this probe none of the counts left: a failure
                # then keeps them for the next flush (they cannot have landed). A
                # keyed command, so on Cluster it asks the node holding the hash.
                await client.exists(key)
                sending = True
                pipe = client.pipeline(transaction=False)
                pipe.hincrby(key, HEARTBEAT + suffix, 1)
                for name, delta in deltas.items():
                    pipe.hincrby(key, name + suffix, delta)
                pipe.expire(key, self.ttl)
                await pipe.execute()
        except BaseException as exc:
            if not sending:
                # Cancelled or failed before the probe's answer: none of them left,
                # so the next flush (stop()'s included) sends them.
                self._sent = previous
            if not isinstance(exc, BackendUnavailable):
                raise
            self.failures += 1
            if not self._failing:
                logger.warning(
                    "fleet metrics: Redis did not answer (%s); counts %s",
                    exc,
                    "of this interval dropped" if sending else "kept for the next flush",
                )
            self._failing = True
            return False
        self.flushes += 1
        if self._failing:
            logger.info("fleet metrics: Redis answers again")
        self._failing = False
        return True

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Flush every ``interval`` seconds from a task on the running loop."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("this FleetFlusher is already running; stop() it first")
        self._sent = self.metrics.counts()  # count from now on, not what came before
        self._task = asyncio.get_running_loop().create_task(self._run(), name=repr(self))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:
                # Anything but Redis failing (handled in flush): a bug, or a clock
                # of the caller's that raised. Say so, and keep counting.
                logger.exception("fleet metrics: a flush failed")

    async def stop(self) -> None:
        """Stop the task, flush what is left, close the client if we made it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.flush()
        await self.backend.aclose()

    async def __aenter__(self) -> FleetFlusher:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


# -- reading the fleet back -------------------------------------------------------------


def lookups(counters: dict[str, int]) -> int:
    """Requests the response cache decided on (@cached routes): lookups and bypasses."""
    return sum(
        count
        for name, count in counters.items()
        if name.startswith(("cache_lookups.", "cache_bypasses."))
    )


def hit_ratio(counters: dict[str, int]) -> float | None:
    """Share of those requests served from the cache (hit, stale or coalesced);
    None without any."""
    total = lookups(counters)
    if not total:
        return None
    served = sum(
        counters.get(f"cache_lookups.{outcome}", 0) for outcome in ("hit", "stale", "coalesced")
    )
    return served / total


@dataclass
class InstanceStats:
    """One instance's counters: ``totals`` over the window and ``per_minute``
    (aligned with :attr:`FleetStats.minutes`; empty dicts where it sent nothing)."""

    name: str
    totals: dict[str, int] = field(default_factory=dict)
    per_minute: list[dict[str, int]] = field(default_factory=list)

    @property
    def last_minute(self) -> int | None:
        """Index in ``per_minute`` of the last minute it flushed in."""
        for index in range(len(self.per_minute) - 1, -1, -1):
            if self.per_minute[index]:
                return index
        return None


@dataclass
class FleetStats:
    """The fleet's last minutes: ``minutes`` (each bucket's start, epoch seconds,
    oldest first), ``totals`` (every instance, whole window) and ``instances``
    by name."""

    minutes: list[int]
    totals: dict[str, int]
    instances: dict[str, InstanceStats]


MAX_MINUTES = 7 * 24 * 60


async def fleet_stats(
    redis: RedisLike | Backend,
    *,
    minutes: int = 15,
    key_prefix: str = DEFAULT_PREFIX,
    timeout: float = 1.0,  # noqa: ASYNC109 -- the Backend's deadline, as everywhere
    clock: Callable[[], float] = time.time,
) -> FleetStats:
    """What every instance flushed in the last ``minutes`` minutes (the current
    one included), in one round trip. Raises
    :class:`~asgi_redis_kit.errors.BackendUnavailable` when Redis does not answer."""
    _check_prefix(key_prefix)
    # One HGETALL per minute, in one pipeline: bounded like everything we send.
    minutes = _check_minutes("minutes", minutes, MAX_MINUTES)
    backend = _backend(redis, timeout)
    now = int(clock() // 60)
    window = list(range(now - minutes + 1, now + 1))
    try:
        async with backend.call("fleet_read") as client:
            pipe = client.pipeline(transaction=False)
            for minute in window:
                pipe.hgetall(bucket_key(key_prefix, minute))
            replies = await pipe.execute()
    finally:
        if backend is not redis:
            await backend.aclose()
    totals: dict[str, int] = {}
    instances: dict[str, InstanceStats] = {}
    for index, reply in enumerate(replies):
        for raw_field, raw_value in reply.items():
            name, _, instance = raw_field.decode(errors="replace").partition("|")
            try:
                value = int(raw_value)
            except ValueError:
                continue  # not one of ours
            row = instances.get(instance)
            if row is None:
                row = instances[instance] = InstanceStats(instance, per_minute=[{} for _ in window])
            row.per_minute[index][name] = row.per_minute[index].get(name, 0) + value
            row.totals[name] = row.totals.get(name, 0) + value
            totals[name] = totals.get(name, 0) + value
    return FleetStats(
        minutes=[minute * 60 for minute in window],
        totals=totals,
        instances=dict(sorted(instances.items())),
    )
