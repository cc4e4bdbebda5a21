"""Counting what each tool asks of Redis.

- Commands: the bench server's ``INFO commandstats`` before and after, so every
  command is counted whoever sent it (MULTI/EXEC included, and commands run inside a
  Lua script, since Redis counts those too). Handshake and the bench's own INFO calls
  are left out.
- Commands sent: the same wrapper counts what the client packs (a pipeline's
  commands one by one, MULTI/EXEC included, a script call as one EVALSHA).
- Round trips: every peer (and we) talk to Redis through redis-py's asyncio client,
  so for the length of a counting window ``AbstractConnection.send_packed_command``
  is wrapped with a counter. A pipeline or a transaction is one round trip however
  many commands it carries. Timed rounds never run with the wrapper in place.
"""

from __future__ import annotations

from collections import Counter
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

_IGNORED = {"info", "client|setinfo", "hello", "client|setname", "select"}
# Background, not per request: the near cache's tracker PINGs each node once a
# second and cashews' client has a 10 s health check. Counted apart (``heartbeats``).
HEARTBEAT = "PING"


async def commandstats(admin: Redis) -> Counter[str]:
    raw: dict[str, Any] = await admin.info("commandstats")
    stats: Counter[str] = Counter()
    for key, value in raw.items():
        name = key.removeprefix("cmdstat_")
        if name not in _IGNORED:
            stats[name.upper()] = int(value["calls"])
    return stats


class Traffic:
    """``async with Traffic(admin) as t: ...`` then ``t.commands``, ``t.round_trips``."""

    def __init__(self, admin: Redis) -> None:
        self.admin = admin
        self.commands: Counter[str] = Counter()
        self.round_trips = 0
        self.connections = 0
        self.heartbeats = 0
        self.sent: Counter[str] = Counter()
        self._before: Counter[str] = Counter()
        self._original: Any = None

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    async def __aenter__(self) -> Traffic:
        self._before = await commandstats(self.admin)
        original = AbstractConnection.send_packed_command
        original_handshake = AbstractConnection.on_connect_check_health
        original_pack = AbstractConnection.pack_command
        traffic = self

        def packing(self: AbstractConnection, *args: Any) -> Any:
            if not getattr(self, "_bench_handshake", False) and args:
                name = args[0]
                text = name.decode() if isinstance(name, bytes) else str(name)
                if text.split()[0].upper() == HEARTBEAT:
                    # send_command packs, then sends: the send is not a request's.
                    self._bench_heartbeat = True  # type: ignore[attr-defined]
                else:
                    traffic.sent[text.split()[0].upper()] += 1
            return original_pack(self, *args)

        async def counting(
            self: AbstractConnection, command: Any, check_health: bool = True
        ) -> None:
            if getattr(self, "_bench_heartbeat", False):
                self._bench_heartbeat = False  # type: ignore[attr-defined]
            elif not getattr(self, "_bench_handshake", False):
                traffic.round_trips += 1
            await original(self, command, check_health)

        async def handshake(self: AbstractConnection, check_health: bool = True) -> None:
            # A new connection's CLIENT SETINFO/HELLO is counted apart, not as a round trip.
            traffic.connections += 1
            self._bench_handshake = True  # type: ignore[attr-defined]
            try:
                await original_handshake(self, check_health=check_health)
            finally:
                self._bench_handshake = False  # type: ignore[attr-defined]

        self._original = (original, original_handshake, original_pack)
        AbstractConnection.pack_command = packing  # type: ignore[method-assign]
        AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
        AbstractConnection.on_connect_check_health = handshake  # type: ignore[method-assign]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        original, original_handshake, original_pack = self._original
        AbstractConnection.pack_command = original_pack  # type: ignore[method-assign]
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
        AbstractConnection.on_connect_check_health = original_handshake  # type: ignore[method-assign]
        after = await commandstats(self.admin)
        after.subtract(self._before)
        self.heartbeats = max(0, after.pop(HEARTBEAT, 0))
        self.commands = Counter({k: v for k, v in after.items() if v > 0})
