"""The near cache: Redis values kept in process memory, invalidated by Redis.

``NearCache`` owns the memory (one byte-bounded LRU) and the tracking
connections; ``NearCache.view(client, prefix)`` gives the synchronous,
I/O-free interface the cache lookup and the session load use::

    view = near.view(client, "myapp:cache:")
    hit = view.get(key)                  # NearHit, or None: ask Redis
    if hit is None:
        ticket = view.begin([key])       # None while tracking is not confirmed
        try:
            value, pttl = await read_value_and_pttl(key)
            view.put(ticket, key, decoded, pttl, size)
        finally:
            view.end(ticket)

See ``_near.py`` for what is guaranteed and why, ``_domain.py`` for the
per-server state shared by views, ``_checks.py`` for what a PING cannot
tell (Sentinel master moved, SWAPDB), ``_tracker.py`` for the
tracking connection, ``_store.py`` for the memory bound and local expiry.
"""

from __future__ import annotations

from asgi_redis_kit.near._near import ABSENT, NearCache, NearHit, NearView, Ticket, pttl_left
from asgi_redis_kit.near._store import NearStats

__all__ = ["ABSENT", "NearCache", "NearHit", "NearStats", "NearView", "Ticket", "pttl_left"]
