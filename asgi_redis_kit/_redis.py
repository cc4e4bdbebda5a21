"""Redis clients from a URL or a ready instance: safe defaults, and who closes what.

``redis=`` everywhere in the library accepts either

* a URL: ``redis://``, ``rediss://``, ``unix://`` (redis-py's own parser), or
  ``memory://[name]`` for an in-process fakeredis server shared by every client
  in this process that names the same ``name``; or
* a ready ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``.

A client made from a URL belongs to us: it gets a short connect timeout,
keepalive, health checks, a bounded blocking pool and one quick retry, and we
close it on ASGI lifespan shutdown or ``aclose()``. It has no socket timeout: it
is meant for calls through :meth:`Backend.call`, whose deadline bounds each one
(commands, health checks and connection handshakes alike). A client passed in stays the caller's:
we never change its settings and never close it, but every call we make through
:meth:`Backend.call` is still bounded by our own deadline.

Redis failures are translated here, in one place, into
:class:`~asgi_redis_kit.errors.BackendUnavailable`; callers decide whether that
means fail closed (sessions) or fail open (cache).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BackendUnavailable

RedisClient: TypeAlias = Redis | RedisCluster
RedisLike: TypeAlias = str | Redis | RedisCluster

DEFAULT_TIMEOUT = 1.0
DEFAULT_MAX_CONNECTIONS = 64
# How often a client of a Sentinel-managed master asks Sentinel who the master is.
SENTINEL_CHECK_INTERVAL = 0.5
# Keys of in-process fakeredis servers, created on first use (never at import).
_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()


def _memory_client(name: str) -> Redis:
    try:
        import fakeredis
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError(
            "redis='memory://' needs fakeredis; install it with "
            "`pip install 'asgi-redis-kit[memory]'`"
        ) from exc
    with _memory_lock:
        server = _memory_servers.setdefault(name, fakeredis.FakeServer())
    client: Redis = fakeredis.FakeAsyncRedis(server=server)
    return client


def _url_client(url: str, timeout: float, max_connections: int) -> Redis:
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        parts = urlsplit(url)
        return _memory_client(parts.netloc + parts.path)
    if scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(
            f"redis={url!r} is not a URL we can connect to; use redis://host:port/db, "
            "rediss:// for TLS, unix:///path/to/socket, or memory:// for an in-process server"
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        # Waiting for a free connection and connecting are bounded on their own too.
        timeout=timeout,
        socket_connect_timeout=timeout,
        # No socket timeout (redis-py's default is 5 s): every command, health check
        # and connection handshake runs inside Backend.call, whose deadline bounds
        # it, and a socket timeout costs an asyncio.wait_for (a task) per send and a
        # timeout context per read, about a sixth of a request's CPU.
        socket_timeout=None,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
    )
    return Redis.from_pool(pool)


class Backend:
    """One Redis client and the knowledge of whether we must close it.

    Parameters:
        redis: a URL or a ready client (see the module docstring).
        timeout: the deadline, in seconds, for any single call made through
            :meth:`call`; also the connect and pool-wait timeout of URL clients.
        max_connections: pool size of URL clients. Callers past it wait up to
            ``timeout`` for a connection, then fail like any other timeout.
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
        self.client: RedisClient
        if isinstance(redis, str):
            self.client = _url_client(redis, timeout, max_connections)
            self.owned = True
        elif isinstance(redis, Redis | RedisCluster):
            self.client = redis
            self.owned = False
        else:
            raise TypeError(
                "redis= takes a URL string or a redis.asyncio.Redis / RedisCluster client, "
                f"got {type(redis).__name__}"
            )
        pool = getattr(self.client, "connection_pool", None)
        # Sentinel(...).master_for(...): see _follow_sentinel.
        self._sentinel = (
            pool if isinstance(pool, SentinelConnectionPool) and pool.is_master else None
        )
        self._next_sentinel_check = 0.0

    def __repr__(self) -> str:
        # Never show the URL: it may carry a password.
        return f"<Backend {type(self.client).__name__} owned={self.owned}>"

    def call(self) -> AbstractAsyncContextManager[RedisClient]:
        """Bound the enclosed Redis work by ``timeout`` and translate its failures::

            async with backend.call() as client:
                await client.get(key)

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
        return _Call(self)

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
        """Close the client if we created it; a caller's client is left alone."""
        if self.owned:
            await self.client.aclose()


class _Call:
    """One :meth:`Backend.call` (a class, not a generator: it runs on every request)."""

    __slots__ = ("backend", "cancelled_before", "ours", "task", "timer")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ours = 0

    async def __aenter__(self) -> RedisClient:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Backend.call() must run inside an asyncio task")
        self.task = task
        self.cancelled_before = task.cancelling()
        backend = self.backend
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(backend.timeout, self._expire)
        sentinel = backend._sentinel
        if sentinel is not None and loop.time() >= backend._next_sentinel_check:
            try:
                await backend._follow_sentinel(sentinel, loop)
            except BaseException as exc:  # __aexit__ is not called when entering fails
                await self.__aexit__(type(exc), exc, exc.__traceback__)
                raise
        return backend.client

    def _expire(self) -> None:
        self.ours += 1
        self.task.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.backend.timeout / 10, self._expire)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.timer.cancel()
        for _ in range(self.ours):
            self.task.uncancel()
        if exc is None:
            return
        if isinstance(exc, asyncio.CancelledError):
            if self.ours and self.task.cancelling() <= self.cancelled_before:
                raise BackendUnavailable("Redis did not answer: TimeoutError") from exc
        elif isinstance(exc, RedisError | RedisClusterException | OSError | TimeoutError):
            # RedisClusterException (SlotNotCoveredError, "cluster down" while
            # slots move) is not a RedisError in redis-py.
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
