"""Stampede protection: in-process single-flight plus a Redis lease lock.

In one process, the first request that misses a key becomes its *leader*; later
requests for the same key wait on an ``asyncio.Event`` and then re-read the
stored entry from Redis. They are never handed the leader's response object:
that response may carry one user's headers, and only what passed the storage
rules is shareable.

Across processes, the leader takes a lease ``SET <lock> <token> NX PX <lease>``.
The same script returns the entry as it is at that moment, so a leader that
arrives just after another one stored the entry serves it instead of running
the handler again. Release is a compare-and-delete on the token (a lease that
expired and was taken by someone else is not ours to delete), done in the same
script that stores the entry. A process that finds the lease held polls the
entry with backoff, and after ``lock_wait`` seconds (or when the lease
vanishes without an entry) runs the handler itself: a stuck leader slows
requests down, it never blocks them.
"""

from __future__ import annotations

import asyncio
import secrets

ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('GET', KEYS[2])}
end
return {0, false}
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Store the entry and release our lease in one round trip (both keys share a hash tag).
STORE_AND_RELEASE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
"""


def new_token() -> str:
    return secrets.token_hex(16)


class SingleFlight:
    """Who leads each key in this process. Shared across requests on purpose:
    it is coordination between them, not state of any one of them."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def lead(self, key: str) -> asyncio.Event | None:
        """An event to set when done if the caller now leads ``key``, else None."""
        if key in self._events:
            return None
        event = self._events[key] = asyncio.Event()
        return event

    def waiting_on(self, key: str) -> asyncio.Event | None:
        return self._events.get(key)

    def done(self, key: str, event: asyncio.Event) -> None:
        if self._events.get(key) is event:
            del self._events[key]
        event.set()
