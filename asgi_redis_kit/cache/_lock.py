"""Stampede protection: in-process single-flight plus a Redis lease lock.

In one process, the first request that misses a key becomes its *leader*; later
requests for the same key wait on its :class:`Flight` and then re-read the
stored entry from Redis. They are never handed the leader's response object:
that response may carry one user's headers, and only what passed the storage
rules is shareable. When Redis fails (before the lookup, or on the store) the
leader leaves that shareable entry on its flight instead, so a burst against a
down or slow Redis still runs the handler once per key in this process.

Across processes, the leader holds a Redis lease (``_scripts`` says how it
is taken and released, ``_redis_layer`` sends it).
"""

from __future__ import annotations

import asyncio
import secrets

from ._entry import Entry


def new_token() -> str:
    return secrets.token_hex(16)


class Flight(asyncio.Event):
    """One key's refill in progress in this process; set when its waiters may go
    on (the entry exists, is stored, or the leader is done).

    ``entry``: what the leader's response would have stored, left here only when
    Redis could not take it, for the requests that waited on this flight; it is
    set as soon as that entry exists, not when the leader's app returns (which
    may be after its background tasks). ``without_redis``: the leader runs
    without Redis, so its waiters have nothing to re-read there."""

    def __init__(self, *, without_redis: bool = False) -> None:
        super().__init__()
        self.entry: Entry | None = None
        self.without_redis = without_redis

    def share(self, entry: Entry) -> None:
        self.entry = entry
        self.set()


class SingleFlight:
    """Who leads each key in this process. Shared across requests on purpose:
    it is coordination between them, not state of any one of them."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def lead(self, key: str, *, without_redis: bool = False) -> Flight | None:
        """A flight to end with :meth:`done` if the caller now leads ``key``, else None."""
        if key in self._flights:
            return None
        flight = self._flights[key] = Flight(without_redis=without_redis)
        return flight

    def waiting_on(self, key: str) -> Flight | None:
        return self._flights.get(key)

    def done(self, key: str, flight: Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.set()
