"""Redis clients from a URL or a ready instance: safe defaults, and who closes what.

``redis=`` everywhere in the library accepts either

* a URL: ``redis://``, ``rediss://``, ``unix://`` (redis-py's own parser), or
  ``memory://[name]`` for an in-process fakeredis server shared by every client
  in this process that names the same ``name``; or
* a ready ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``.

A client made from a URL belongs to us: it gets a short connect timeout,
keepalive, health checks, a bounded blocking pool and no retry (a command is
never sent twice, see ``_clients.url_client``), and we close it on ASGI lifespan
shutdown or ``aclose()``. It has no socket timeout: it is meant for calls
through :meth:`Backend.call`, whose deadline bounds each one (commands, health
checks and connection handshakes alike). A client passed in stays the caller's:
we never change its settings and never close it, but every call we make through
:meth:`Backend.call` is still bounded by our own deadline.

Event loops. A redis-py client is tied to the event loop that opened its
connections, yet one app often meets several loops: Starlette's
``TestClient(app)`` without ``with`` runs every request on a new loop, and
pytest-asyncio gives every test its own. So what we make from a URL is one
client *per loop*, made on the loop's first call (the data of a ``memory://``
server is shared by all of them). Nobody may call ``aclose()`` in those setups
(no lifespan runs), so each client is also closed without being asked, when its
loop shuts down or was closed, or at garbage collection or exit (see ``_clients``).

A client passed in is used as it is on whatever loop calls; its connections
belong to the loop that opened them. So close it (``await client.aclose()``)
before that loop ends -- at lifespan shutdown, or in a test's teardown -- and it
reconnects on the next loop; or build the app, client included, per test. Reused
on a new loop with connections of a closed one, it is a clear ``RuntimeError``.

Redis failures are translated here, in one place, into
:class:`~asgi_redis_kit.errors.BackendUnavailable`; callers decide whether that
means fail closed (sessions) or fail open (cache).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisClusterException, RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._calls import CallStats
from ._clients import LoopClient, connected, drop_all, url_client
from .errors import BackendUnavailable

RedisClient: TypeAlias = Redis | RedisCluster
RedisLike: TypeAlias = str | Redis | RedisCluster

DEFAULT_TIMEOUT = 1.0
DEFAULT_MAX_CONNECTIONS = 64
# The longest time, in seconds, any option that becomes a Redis TTL may be. Redis
# refuses a PEXPIRE whose deadline passes 2**63 ms from the epoch ("invalid expire
# time"), and int() of an infinity raises: a setting past this would fail every
# write that uses it, long after startup. A century is generous and far inside both.
MAX_SECONDS = 100 * 365 * 24 * 3600
# How often a client of a Sentinel-managed master asks Sentinel who the master is.
SENTINEL_CHECK_INTERVAL = 0.5
# The event loop runs a timer this early (its _clock_resolution): a deadline that
# close counts as reached, as it does for the loop's own timers.
_CLOCK_SLACK = time.get_clock_info("monotonic").resolution


def check_seconds(name: str, value: float) -> None:
    """ValueError naming ``name`` unless ``value`` is at most :data:`MAX_SECONDS`
    (NaN and infinities never are). Callers check the lower bound themselves."""
    if not value <= MAX_SECONDS:
        raise ValueError(
            f"{name} must be at most {MAX_SECONDS} seconds (100 years), the longest "
            f"time we let Redis keep anything; got {value!r}"
        )


class Backend:
    """One Redis client per event loop and the knowledge of whether we must close it.

    Parameters:
        redis: a URL or a ready client (see the module docstring).
        timeout: the deadline, in seconds, for any single call made through
            :meth:`call`; also the connect and pool-wait timeout of URL clients.
        max_connections: pool size of URL clients (per event loop). Callers past
            it wait up to ``timeout`` for a connection, then fail like any other
            timeout.

    ``client`` is the client of the running loop (with no loop running: the one
    used last, for its type and connection options); ``cluster`` whether it is a
    ``RedisCluster``; Redis work goes through :meth:`call`, which bounds it.
    ``calls`` counts the calls that failed (:class:`~._calls.CallStats`), and
    times them all once a metrics exporter set ``calls.latency``; ``label`` is
    the operation a call is counted under when it names none.
    """

    def __init__(
        self,
        redis: RedisLike,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = timeout
        self.calls = CallStats()
        self.label = "redis"
        client: RedisClient
        # A URL client not yet used: the first loop to call takes it.
        self._spare: Redis | None = None
        if isinstance(redis, str):
            url = redis
            client = self._spare = url_client(url, timeout, max_connections)
            self._make: Callable[[], Redis] | None = lambda: url_client(
                url, timeout, max_connections
            )
            self.owned = True
        elif isinstance(redis, Redis | RedisCluster):
            client = redis
            self._make = None
            self.owned = False
        else:
            raise TypeError(
                "redis= takes a URL string or a redis.asyncio.Redis / RedisCluster client, "
                f"got {type(redis).__name__}"
            )
        if client.get_encoder().decode_responses:
            # Replies must stay bytes: stored values may be any bytes (a corrupt or
            # hostile field), and redis-py would fail to decode them with an error
            # that is not a RedisError -- a 500 instead of a fresh session or a miss.
            raise ValueError(
                "redis= must be a client made with decode_responses=False (the default); "
                "asgi_redis_kit decodes replies itself. Pass a URL without "
                "decode_responses, or a client of its own for the library"
            )
        # Every client of this Backend has the same type (one per loop, all made
        # alike), so whether it is a Cluster is known once and for all.
        self.cluster = isinstance(client, RedisCluster)
        # The loop of the last call and its client, in one tuple so a thread that
        # reads it never pairs one loop with another loop's client.
        self._current: tuple[asyncio.AbstractEventLoop | None, RedisClient] = (None, client)
        # Our clients by loop.
        self._bound: dict[asyncio.AbstractEventLoop, LoopClient] = {}
        self._lock = threading.Lock()
        if self.owned:
            weakref.finalize(self, drop_all, self._bound)
        pool = getattr(client, "connection_pool", None)
        # Sentinel(...).master_for(...): see _follow_sentinel.
        self._sentinel = (
            pool if isinstance(pool, SentinelConnectionPool) and pool.is_master else None
        )
        self._next_sentinel_check = 0.0
        # The deadline keeper of the last loop that called, and those of all loops.
        self._watch: _Watch | None = None
        self._watches: dict[asyncio.AbstractEventLoop, _Watch] = {}

    def __repr__(self) -> str:
        # Never show the URL: it may carry a password.
        return f"<Backend {type(self._current[1]).__name__} owned={self.owned}>"

    @property
    def client(self) -> RedisClient:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self._current[1]
        current, client = self._current
        return client if current is loop else self._bind(loop)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> RedisClient:
        """The client for ``loop``, made on its first call (the slow path)."""
        with self._lock:  # two threads, each with its loop, must not share a client
            previous, client = self._current
            if self._make is None:
                if previous is not None and previous.is_closed() and connected(client):
                    raise RuntimeError(
                        "the Redis client passed as redis= still holds connections of an "
                        "event loop that is closed, and cannot use them on this one; "
                        "create it on the loop that uses it (in the app's lifespan, or in "
                        "each test) and close it there, or pass a URL and let us keep "
                        "one client per loop"
                    )
            else:
                bound = self._bound.get(loop)
                if bound is None:
                    self._drop_dead()
                    made, self._spare = self._spare or self._make(), None
                    bound = self._bound[loop] = LoopClient(made, loop)
                client = bound.client
            self._current = (loop, client)
            return client

    def _watch_for(self, loop: asyncio.AbstractEventLoop) -> _Watch:
        """The deadline keeper of ``loop``, made on its first call (the slow path)."""
        with self._lock:
            watch = self._watches.get(loop)
            if watch is None:
                for closed in [old for old in self._watches if old.is_closed()]:
                    del self._watches[closed]
                watch = self._watches[loop] = _Watch(loop)
            self._watch = watch
            return watch

    def _drop_dead(self) -> None:
        """Close and forget the clients of loops that closed, so a test suite that
        runs hundreds of loops keeps none of them."""
        for loop, bound in list(self._bound.items()):
            if bound.drop_if_dead():
                self._bound.pop(loop, None)

    def call(self, op: str | None = None) -> AbstractAsyncContextManager[RedisClient]:
        """Bound the enclosed Redis work by ``timeout`` and translate its failures::

            async with backend.call() as client:
                await client.get(key)

        ``op`` names the work for ``calls`` (default: ``label``): a name from the
        code, never a key, as it becomes a metrics label.

        At the deadline the enclosed work is cancelled, and the block ends with
        :class:`~asgi_redis_kit.errors.BackendUnavailable`. redis-py drops a
        connection whose command was cancelled mid-reply (CVE-2023-28859), so this
        cannot desync the pool. redis-py can also *swallow* that cancel: on Python
        < 3.12 ``asyncio.wait_for``, which it sends with, returns normally when the
        send completes as the cancel arrives (CPython gh-86296), and redis-py goes
        on reading and retrying for up to its own socket timeouts. So work that is
        still running is cancelled again every tenth of ``timeout`` until it stops.
        Every cancel is delivered inside the block, where the work is suspended,
        and withdrawn on the way out, so none leaks to the caller; a cancel from
        anyone else still propagates as ``CancelledError``.
        """
        return _Call(self, self.label if op is None else op)

    async def _follow_sentinel(
        self, pool: SentinelConnectionPool, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Ask Sentinel who the master is; after a failover, leave the old one.

        redis-py asks Sentinel only when it opens a connection, so pooled
        connections keep writing to a demoted master until Sentinel reconfigures
        it (8-10 s after the switch), and those acknowledged writes are lost when
        it resyncs. ``get_master_address()`` drops the idle connections when the
        address changed; connections in use right now are marked to be dropped
        when they come back (redis-py's asyncio pool does not check that itself).
        At most one check per ``SENTINEL_CHECK_INTERVAL`` and one at a time; a
        Sentinel that does not answer in half the deadline is skipped, not fatal.
        """
        self._next_sentinel_check = math.inf
        try:
            before = pool.master_address
            async with asyncio.timeout(self.timeout / 2):
                master = await pool.get_master_address()  # type: ignore[no-untyped-call]
                if before is not None and master != before:
                    await pool.update_active_connections_for_reconnect()  # type: ignore[no-untyped-call]
                    # Some may have come back during the first disconnect.
                    await pool.disconnect(inuse_connections=False)
        except (RedisError, OSError, TimeoutError):
            # Sentinel unreachable or mid-failover: the pool's own connect path
            # asks again and reports what it finds.
            pass
        finally:
            self._next_sentinel_check = loop.time() + SENTINEL_CHECK_INTERVAL

    async def aclose(self) -> None:
        """Close the client of this loop if we created it (and those of loops that
        are closed); a caller's client is left alone. A later call makes a new one.
        Clients of other running loops are closed when those loops shut down."""
        if not self.owned:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._current[0] is loop:
                self._current = (None, self._current[1])
            self._drop_dead()
            bound = self._bound.pop(loop, None)
        if bound is not None:
            await bound.guard.aclose()  # its finally closes the client


class _Watch:
    """The deadlines of one Backend's calls running on one loop, kept by a single
    loop timer set for the earliest of them.

    A timer per call (``call_later`` on entry, ``cancel`` on exit) cost more than
    the rest of the deadline: asyncio's timers are Python objects compared in
    Python in the loop's heap, and a cancelled one stays there until it reaches
    the head, so under concurrency the heap grows and every push gets dearer.
    Calls end long before their deadline, so here a call only enters and leaves a
    dict; the timer fires about once per ``timeout`` while calls run, cancels the
    calls whose deadline passed (each then re-cancels on a timer of its own, see
    ``_Call._expire``) and is set again for the earliest deadline left.
    """

    __slots__ = ("calls", "handle", "loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: dict[_Call, None] = {}
        self.handle: asyncio.TimerHandle | None = None
        self.when = math.inf

    def schedule(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.when = when
        self.handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.handle = None
        self.when = math.inf
        now = self.loop.time() + _CLOCK_SLACK
        expired = [call for call in self.calls if call.deadline <= now]
        for call in expired:
            del self.calls[call]
            call._expire()
        if self.calls:
            self.schedule(min(call.deadline for call in self.calls))


class _Call:
    """One :meth:`Backend.call` (a class, not a generator: it runs on every request)."""

    __slots__ = (
        "backend",
        "cancelled_before",
        "deadline",
        "op",
        "ours",
        "started",
        "task",
        "timer",
        "watch",
    )
    timer: asyncio.TimerHandle

    def __init__(self, backend: Backend, op: str) -> None:
        self.backend = backend
        self.op = op
        self.ours = 0
        # Negative: not timed (no latency histogram when the call began).
        self.started = -1.0 if backend.calls.latency is None else time.perf_counter()

    async def __aenter__(self) -> RedisClient:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Backend.call() must run inside an asyncio task")
        self.task = task
        self.cancelled_before = task.cancelling()
        backend = self.backend
        loop = asyncio.get_running_loop()
        current, client = backend._current
        if current is not loop:
            client = backend._bind(loop)
        watch = backend._watch
        if watch is None or watch.loop is not loop:
            watch = backend._watch_for(loop)
        self.watch = watch
        self.deadline = deadline = loop.time() + backend.timeout
        watch.calls[self] = None
        if deadline < watch.when:
            watch.schedule(deadline)
        sentinel = backend._sentinel
        if sentinel is not None and loop.time() >= backend._next_sentinel_check:
            try:
                await backend._follow_sentinel(sentinel, loop)
            except BaseException as exc:  # __aexit__ is not called when entering fails
                await self.__aexit__(type(exc), exc, exc.__traceback__)
                raise
        return client

    def _expire(self) -> None:
        """At the deadline (from ``_Watch``), then every tenth of the timeout until
        the block ends (see :meth:`Backend.call`)."""
        self.ours += 1
        self.task.cancel()
        self.timer = self.watch.loop.call_later(self.backend.timeout / 10, self._expire)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.ours:
            self.timer.cancel()
            for _ in range(self.ours):
                self.task.uncancel()
        else:
            # Not expired: still waiting in the watch.
            del self.watch.calls[self]
        calls = self.backend.calls
        if self.started >= 0 and calls.latency is not None:
            calls.latency.observe(self.op, time.perf_counter() - self.started)
        if exc is None:
            return
        if isinstance(exc, asyncio.CancelledError):
            if self.ours and self.task.cancelling() <= self.cancelled_before:
                calls.timeouts[self.op] += 1
                raise BackendUnavailable("Redis did not answer: TimeoutError") from exc
        elif isinstance(exc, RedisError | RedisClusterException | OSError | TimeoutError):
            # RedisClusterException (SlotNotCoveredError, "cluster down" while
            # slots move) is not a RedisError in redis-py.
            if isinstance(exc, TimeoutError):
                calls.timeouts[self.op] += 1
            else:
                calls.errors[self.op] += 1
            raise BackendUnavailable(f"Redis did not answer: {type(exc).__name__}") from exc


async def serve_with_lifespan_close(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    close: Callable[[], Awaitable[None]],
) -> None:
    """Run a lifespan scope through ``app`` and call ``close`` at shutdown.

    ``close`` runs after the inner app has finished its own shutdown and before
    the server hears about it, so nothing of ours outlives the event loop.
    """

    async def send_then_close(message: Message) -> None:
        if message["type"] in {"lifespan.shutdown.complete", "lifespan.shutdown.failed"}:
            await close()
        await send(message)

    await app(scope, receive, send_then_close)
