"""One tracking connection to one Redis node, from connect to close.

A :class:`Tracker` is a task of one event loop that keeps one dedicated
connection in this state, and says so only once Redis has confirmed it::

    CLIENT ID                                   -> our id
    CLIENT TRACKING ON REDIRECT <id> BCAST PREFIX p1 PREFIX p2 ...   -> OK
    SUBSCRIBE __redis__:invalidate              -> subscribed, 1

then reads invalidations (a list of keys, or nil for FLUSHDB/FLUSHALL) and
answers to its own heartbeat PINGs until something goes wrong, and starts over.

Why a raw redis-py ``Connection`` and not redis-py's ``PubSub``: PubSub
reconnects and re-subscribes on its own after a ``CLIENT KILL`` but never turns
tracking back on, so it would look healthy while receiving nothing; and under
RESP3 (redis-py 8's default) a PubSub redirect target receives no invalidation
at all. The connection is made by the client's own connection class with the
client's own connection keyword arguments (``protocol=2`` and raw replies
forced), so a password, TLS, the db and Sentinel's master lookup
(``SentinelManagedConnection`` asks Sentinel when it connects) are inherited
rather than copied.

Why BCAST with prefixes: the server keeps no per-key table (default tracking
costs memory for keys x clients and evicts keys from it at
``tracking-table-max-keys``, sending spurious invalidations), and it works the
same for a key we never read, which is what a negative ("no such key") entry
needs. The price is an invalidation for every write under the prefixes, read or
not; the prefixes are the library's own key namespaces, so that is the traffic
we care about anyway.

Losing tracking: a connection error, EOF, ``CLIENT KILL``, a Redis restart, a
Sentinel master change, or a heartbeat PING not answered within
``heartbeat_timeout`` (a silent hang: a dead peer, a paused server, a
partition that drops packets) all end the same way: the owner is told
(``on_lost``: it flushes its entries and stops serving from memory), the
connection is dropped, and after a short backoff (0.05 s doubling to 1 s,
reset after a confirmed handshake) the handshake runs again. A hang is
noticed at most ``heartbeat + heartbeat_timeout`` after the last answer.
Changing the prefixes (``retrack``) starts over at once, without backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from redis.asyncio.connection import AbstractConnection

from asgi_redis_kit._clients import close_socket

if TYPE_CHECKING:
    from asgi_redis_kit.near._checks import Check

State = Literal["connecting", "tracking", "lost", "closed"]

CHANNEL = b"__redis__:invalidate"
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0


class _Lost(Exception):
    """Tracking can no longer be trusted on this connection (the reason)."""


class _Retrack(_Lost):
    """Not a failure: the prefixes changed and must be registered again."""


class Tracker:
    """Keeps tracking on for ``prefixes()`` on one node.

    Parameters:
        name: the node, for stats and errors (``"host:port"``).
        connect: makes a new, unconnected connection to the node.
        prefixes: the current prefixes to track (read at each handshake).
        on_up, on_lost: tracking confirmed; tracking no longer trusted.
        on_alive: a PONG came, so ``heard_at`` moved on.
        on_invalidate: keys invalidated (decoded with ``encoding``, the
            client's), or ``None`` for "everything".
        checks: extra checks (``_checks.py``: is this still the master? did
            SWAPDB run?), run when tracking is about to be confirmed and at
            every heartbeat, raising :class:`_Lost` when it must be dropped.
    """

    def __init__(
        self,
        name: str,
        *,
        connect: Callable[[], AbstractConnection],
        prefixes: Callable[[], Sequence[str]],
        on_up: Callable[[Tracker], None],
        on_lost: Callable[[Tracker], None],
        on_invalidate: Callable[[list[str] | None], None],
        on_state: Callable[[Tracker], None],
        on_alive: Callable[[Tracker], None],
        heartbeat: float,
        heartbeat_timeout: float,
        checks: Sequence[Check] = (),
        encoding: str = "utf-8",
    ) -> None:
        self.name = name
        self._connect = connect
        self._prefixes = prefixes
        self._on_up = on_up
        self._on_lost = on_lost
        self._on_invalidate = on_invalidate
        self._on_state = on_state
        self._on_alive = on_alive
        self._checks = tuple(checks)
        self.encoding = encoding
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self.state: State = "connecting"
        self.last_error: str | None = None
        self.connection: AbstractConnection | None = None
        self._retrack = asyncio.Event()
        self._stopping = False
        self._abandoned = False
        self._pong: asyncio.Future[None] | None = None
        self._noticed = False
        # loop.time() when this connection last proved every invalidation sent
        # before it was read: the handshake, then each PONG (read in order).
        self.heard_at = -math.inf
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"asgi_redis_kit near-cache tracker {name}"
        )

    @property
    def tracking(self) -> bool:
        return self.state == "tracking"

    def retrack(self) -> None:
        """The prefixes changed: drop the connection and register them again."""
        self._retrack.set()

    def cancel(self) -> None:
        """Stop for good (from the tracker's own loop)."""
        self._stopping = True
        self.task.cancel()

    async def aclose(self) -> None:
        self.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def _notice_loss(self) -> None:
        """Tell the owner now, before any await: until it knows, it serves
        entries whose invalidations can no longer arrive. Once per connection."""
        if self._noticed:
            return
        self._noticed = True
        was, self.state = self.state, "lost"
        if was != "lost":
            self._on_state(self)
        self._on_lost(self)

    def _set(self, state: State) -> None:
        self.state = state
        self._on_state(self)

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        current = asyncio.current_task()
        assert current is not None
        try:
            while True:
                self._retrack.clear()
                self._noticed = False
                connection = self.connection = self._connect()
                try:
                    async with asyncio.timeout(self.heartbeat + self.heartbeat_timeout):
                        await self._handshake(connection)
                    if self._stopping:  # a cancel swallowed on the way (gh-86296)
                        raise asyncio.CancelledError
                    if self._retrack.is_set():  # the prefixes changed meanwhile
                        raise _Retrack
                    self.heard_at = asyncio.get_running_loop().time()
                    self._set("tracking")
                    backoff = BACKOFF_FIRST
                    self._on_up(self)
                    await self._serve(connection)
                except _Retrack:
                    pass
                except GeneratorExit:
                    # Garbage collected on a loop that closed under us: no awaiting.
                    self._abandoned = True
                    raise
                except Exception as exc:
                    # Any failure, expected (_Lost, RedisError, OSError, TimeoutError)
                    # or not (a reply we fail to parse), ends this connection only:
                    # a tracker that died would leave its views bypassing for good.
                    if self._abandoned:
                        raise
                    self.last_error = f"{type(exc).__name__}: {exc}"
                finally:
                    self.connection = None
                    if self._abandoned:
                        self.state = "lost"
                        close_socket(connection)
                    else:
                        self._notice_loss()
                        await _disconnect(connection)
                if self._stopping or current.cancelling():
                    # A cancel that lands as a timeout expires is turned into a
                    # TimeoutError by Python 3.11's asyncio.timeout and by
                    # redis-py's connect timeout (CPython gh-102780), and caught
                    # above; the task still counts it, so the stop sticks.
                    raise asyncio.CancelledError
                if self._retrack.is_set():
                    continue
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            # A check's own connection outlives the tracked one; not the tracker.
            if self._abandoned:
                for check in self._checks:
                    check.close_now()
            else:
                for check in self._checks:
                    await check.aclose()
            self._set("closed")

    async def _handshake(self, connection: AbstractConnection) -> None:
        await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_command("CLIENT", "ID", check_health=False)
        client_id = await connection.read_response(timeout=math.inf)
        if not isinstance(client_id, int):
            raise _Lost(f"CLIENT ID answered {client_id!r}")
        command: list[str | int] = ["CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST"]
        for prefix in self._prefixes():
            if prefix:  # the empty prefix is "every key": no PREFIX at all
                command += ["PREFIX", prefix]
        await connection.send_command(*command, check_health=False)
        reply = await connection.read_response(timeout=math.inf)
        if reply not in (b"OK", "OK"):
            raise _Lost(f"CLIENT TRACKING answered {reply!r}")
        await connection.send_command("SUBSCRIBE", CHANNEL, check_health=False)
        reply = await connection.read_response(timeout=math.inf)
        if not (isinstance(reply, list) and reply[:2] == [b"subscribe", CHANNEL]):
            raise _Lost(f"SUBSCRIBE answered {reply!r}")
        for check in self._checks:
            await check.run(connection, start=True)

    async def _serve(self, connection: AbstractConnection) -> None:
        """Read and heartbeat until tracking is lost (:class:`_Lost`) or the
        prefixes changed (:class:`_Retrack`); it never returns."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(connection))
        retrack = loop.create_task(self._retrack.wait())
        try:
            while True:
                await asyncio.wait(
                    (reader, retrack), timeout=self.heartbeat, return_when=asyncio.FIRST_COMPLETED
                )
                self._stop_if_done(reader, retrack)
                for check in self._checks:
                    # A slow check is not a lost connection: skip it this time.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.heartbeat_timeout):
                            await check.run(connection, start=False)
                pong = self._pong = loop.create_future()
                async with asyncio.timeout(self.heartbeat_timeout):
                    await connection.send_command("PING", check_health=False)
                    await asyncio.wait((reader, retrack, pong), return_when=asyncio.FIRST_COMPLETED)
                self._stop_if_done(reader, retrack)
        except TimeoutError:
            raise _Lost(f"no PONG within {self.heartbeat_timeout} s") from None
        except GeneratorExit:
            self._abandoned = True
            raise
        finally:
            # Abandoned: the loop is closed, so no cancel can be scheduled; the
            # two tasks are garbage with us.
            if not self._abandoned:
                self._notice_loss()  # before awaiting the two tasks below
                for task in (reader, retrack):
                    task.cancel()
                await asyncio.gather(reader, retrack, return_exceptions=True)

    @staticmethod
    def _stop_if_done(reader: asyncio.Task[None], retrack: asyncio.Task[Any]) -> None:
        if reader.done():
            error = reader.exception()
            raise error if error is not None else _Lost("the connection closed")
        if retrack.done():
            raise _Retrack

    async def _read(self, connection: AbstractConnection) -> None:
        while True:
            message = await connection.read_response(timeout=math.inf)
            if not isinstance(message, list) or not message:
                raise _Lost(f"unexpected reply {message!r}")
            kind = message[0]
            if kind == b"message" and len(message) == 3 and message[1] == CHANNEL:
                keys = message[2]
                if keys is None:
                    self._on_invalidate(None)
                else:
                    self._on_invalidate([_decode(key, self.encoding) for key in keys])
            elif kind == b"pong":
                self.heard_at = asyncio.get_running_loop().time()
                self._on_alive(self)
                if self._pong is not None and not self._pong.done():
                    self._pong.set_result(None)
            elif kind == b"unsubscribe":
                raise _Lost("unsubscribed from the invalidation channel")
            # Anything else ("subscribe" again, other channels): nothing to do.


def _decode(key: bytes | str, encoding: str) -> str:
    # Keys are str to the caller, which the client encodes with its own
    # encoding; bytes that encoding cannot decode still map to one key, the
    # one a str would encode to with this handler.
    return key if isinstance(key, str) else key.decode(encoding, "surrogateescape")


async def _disconnect(connection: AbstractConnection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.disconnect(nowait=True), 1.0)
