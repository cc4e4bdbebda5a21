"""What a tracker's PING cannot tell: the extra checks run when tracking is
confirmed and at every heartbeat.

A :class:`Check` raises :class:`~asgi_redis_kit.near._tracker._Lost` when the
tracked connection can no longer be trusted, although it is alive:

- :class:`StillMaster` (Sentinel): the master moved; a demoted master still
  answers PING but no longer receives the writes.
- :class:`NoSwapdb` (one server, not a cluster): ``SWAPDB`` replaced a db's
  contents, and Redis (7.0 at least) announces that to no tracking client. It
  counts the server's SWAPDB calls (``INFO commandstats``) on a connection of
  its own, since a RESP2 connection that has subscribed can send nothing but
  PING and (UN)SUBSCRIBE. The count is compared with the one taken when
  tracking was confirmed, so a SWAPDB is seen at the next check that gets an
  answer, however many were skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError, ResponseError

from asgi_redis_kit._clients import close_socket
from asgi_redis_kit.near._tracker import _Lost


class Check:
    """One extra check; ``start`` is true when tracking is about to be confirmed."""

    async def run(self, connection: AbstractConnection, *, start: bool) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """The tracker stopped."""

    def close_now(self) -> None:
        """The tracker's loop closed under it: no awaiting."""


class StillMaster(Check):
    def __init__(self, pool: SentinelConnectionPool) -> None:
        self._pool = pool

    async def run(self, connection: AbstractConnection, *, start: bool) -> None:
        try:
            address = await self._pool.get_master_address()  # type: ignore[no-untyped-call]
        except (RedisError, OSError):
            return  # Sentinel unreachable: the server's own answers decide
        here = (getattr(connection, "host", None), getattr(connection, "port", None))
        if tuple(address) != here:
            raise _Lost(f"the master moved to {address[0]}:{address[1]}")


_SWAPDB_CALLS = re.compile(rb"^cmdstat_swapdb:calls=(\d+)", re.MULTILINE)


class NoSwapdb(Check):
    def __init__(self, connect: Callable[[], AbstractConnection]) -> None:
        self._connect = connect
        self._probe: AbstractConnection | None = None
        self._calls: int | None = None
        # INFO refused (an ACL, a renamed command): SWAPDB cannot be seen, and
        # only max_ttl bounds it. Asking again would only fail again.
        self._unavailable = False

    async def run(self, connection: AbstractConnection, *, start: bool) -> None:
        if self._unavailable:
            return
        if start:
            # A fresh probe with each tracked connection: an old one could be
            # on the server Sentinel called master before a failover.
            self.close_now()
        try:
            calls = await self._count(connection)
        except ResponseError:
            self._unavailable = True
            self.close_now()
            return
        except Exception as exc:
            # Cannot tell: not trusted (a false loss is only a flush).
            self.close_now()
            raise _Lost(f"SWAPDB count unavailable: {type(exc).__name__}: {exc}") from exc
        if start or self._calls is None:
            self._calls = calls
        elif calls != self._calls:
            self._calls = None
            raise _Lost("SWAPDB ran")

    async def _count(self, tracked: AbstractConnection) -> int:
        probe = self._probe
        if probe is None:
            probe = self._probe = self._connect()
        try:
            if not probe.is_connected:
                # Explicitly: send_command's own connect skips a Sentinel-managed
                # connection's master lookup (redis-py 8) and goes to its defaults.
                await probe.connect()  # type: ignore[no-untyped-call]
            await probe.send_command("INFO", "commandstats", check_health=False)
            reply = await probe.read_response()
        except BaseException:
            # Cancelled (a slow check is skipped) or failed mid-reply: the
            # connection may still owe us a reply, so it is not reused.
            self.close_now()
            raise
        if _address(probe) != _address(tracked):
            raise _Lost(f"the probe reached {_address(probe)}, not {_address(tracked)}")
        if isinstance(reply, str):
            reply = reply.encode()
        if not isinstance(reply, bytes):
            raise ResponseError(f"INFO answered {reply!r}")
        found = _SWAPDB_CALLS.search(reply)
        return int(found.group(1)) if found else 0

    async def aclose(self) -> None:
        # Closed without awaiting: Python 3.11's wait_for (in _disconnect) can
        # swallow a cancel that lands as it finishes, and a tracker being
        # stopped must not carry on.
        self.close_now()

    def close_now(self) -> None:
        probe, self._probe = self._probe, None
        close_socket(probe)


def _address(connection: AbstractConnection) -> tuple[object, ...]:
    # Where a connection went (a Sentinel-managed one learns it when it connects).
    return tuple(getattr(connection, name, None) for name in ("host", "port", "path"))
