"""The Redis clients we make from a URL, and closing them without being asked.

A client made from a URL gets a short connect timeout, keepalive, health checks,
a bounded blocking pool and no retry (:func:`url_client`); ``memory://[name]``
gives an in-process fakeredis server shared by every client of this process that
names it. :class:`~asgi_redis_kit._redis.Backend` makes one such client per event
loop, and each is closed, even when nobody calls ``aclose()``:

* when its loop shuts down (``asyncio.run``, ``asyncio.Runner``, anyio,
  pytest-asyncio and uvicorn all do): a small async generator, registered with
  the loop, runs ``aclose()`` from ``loop.shutdown_asyncgens()``;
* when its loop was closed without shutting down: the next loop to call closes
  its sockets, without awaiting on the dead loop;
* when the Backend is garbage collected, or the interpreter exits: every client
  left is closed then, on its loop's thread if that loop still runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

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


def url_client(url: str, timeout: float, max_connections: int) -> Redis:
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
        # Never send a command twice. redis-py resends one whose connection broke,
        # and when that happens after Redis ran it (the reply was lost), the resend
        # runs it again: one incr counted twice. A broken call is the caller's
        # "unknown" (a 503, or the cache failing open) instead. Dead pooled
        # connections are still replaced before use: the pool checks each one
        # it hands out (ensure_connection) and reconnects one that was closed.
        retry=Retry(NoBackoff(), retries=0),
    )
    return Redis.from_pool(pool)


async def _close_at_shutdown(client: Redis) -> AsyncGenerator[None, None]:
    """Suspended for the life of ``client``'s loop; closing it closes the client.

    An async generator because that is what a loop closes, while it can still
    await, as it shuts down (``shutdown_asyncgens``): asyncio has no other hook
    into a loop's end.
    """
    try:
        yield
    finally:
        await client.aclose()


def _drop_connections(client: Redis) -> None:
    """Close the connections of ``client`` now, without awaiting; run it in the
    thread of their loop, or when that loop is closed.

    On a live loop the transport closes its socket on the loop's next turn. A
    closed loop cannot run that callback (``close()`` marks the transport
    closing, then fails to schedule it), so its part is done here: the socket is
    closed. Either way redis-py's connection, the stream and the transport are
    told, or each destructor reports the socket unclosed (``ResourceWarning``);
    asyncio has no public API for a transport whose loop is gone.
    """
    pool = client.connection_pool
    for connection in (*pool._available_connections, *pool._in_use_connections):
        close_socket(connection)


def connected(client: Redis | RedisCluster) -> bool:
    """Whether ``client`` has an open connection in its pool (Cluster: unknown, no)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        return False
    connections = (*pool._available_connections, *pool._in_use_connections)
    return any(getattr(connection, "_writer", None) is not None for connection in connections)


class LoopClient:
    """A client we made, for one event loop, and the guard that closes it."""

    __slots__ = ("client", "guard", "loop")

    def __init__(self, client: Redis, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.guard = _close_at_shutdown(client)
        # Run it to its yield now, without a task or a suspension: the first step
        # registers it with the running loop (the loop's asyncgen hooks).
        with suppress(StopIteration):
            self.guard.asend(None).send(None)

    def drop_if_dead(self) -> bool:
        """Close the client of a closed loop here and now; whether it was closed."""
        if not self.loop.is_closed():
            return False
        _drop_connections(self.client)
        return True

    def drop(self) -> None:
        """Close the client now, from any thread (garbage collection, exit)."""
        loop = self.loop
        if loop.is_running() and not _runs_here(loop):
            loop.call_soon_threadsafe(_drop_connections, self.client)
        else:
            _drop_connections(self.client)


def _runs_here(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def drop_all(bound: dict[asyncio.AbstractEventLoop, LoopClient]) -> None:
    """The Backend is gone (garbage collected, or the interpreter exits): close
    its clients now. Not left to the guards' own finalizers: the Backend's
    garbage often holds the clients too, and their connections would report
    themselves unclosed in the same collection, before any scheduled close ran."""
    for entry in list(bound.values()):
        entry.drop()


def close_socket(connection: AbstractConnection | None) -> None:
    """Close ``connection``'s socket now, without awaiting: its loop is closed
    (or closing), so the transport's own close callback would never run.
    asyncio has no public API for a transport whose loop is gone. Shared by
    the per-loop clients and the near cache's tracking connections."""
    writer = getattr(connection, "_writer", None)
    if connection is None or writer is None:
        return
    connection._writer = connection._reader = None
    try:
        writer.close()
    except RuntimeError:  # "Event loop is closed"
        transport = writer.transport
        sock = getattr(transport, "_sock", None)
        if sock is not None:
            sock.close()
            transport._sock = None  # or its destructor reports it unclosed
