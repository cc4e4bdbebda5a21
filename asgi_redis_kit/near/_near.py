"""NearCache and NearView: values of Redis keys kept in process memory, safely.

A near cache may answer from memory only what Redis would answer right now, up
to the invalidation lag. Four things make that hold here:

1. **Tracking, confirmed.** Each Redis node a client talks to has one
   :class:`~asgi_redis_kit.near._tracker.Tracker` (a dedicated connection in
   BCAST tracking mode for the registered prefixes). A view is *usable* only
   while every tracker of its client has confirmed ``CLIENT TRACKING`` and
   ``SUBSCRIBE``; otherwise ``get`` and ``begin`` return ``None`` and the caller
   goes to Redis (bypass). Losing tracking flushes every entry of that client.
   And ``get`` serves only while every tracker was heard from (its handshake,
   then each PONG, read after every invalidation sent before it) within
   ``heartbeat + heartbeat_timeout``: after the loop was blocked that long,
   invalidations may be waiting unread in the tracker's socket.
2. **No read older than an invalidation.** The read reply and the invalidation
   arrive on different connections, so a reply can be overtaken:
   [read] GET -> [other] SET -> [tracker] invalidate -> [read] old reply. So
   ``begin`` registers the keys as pending before the read is sent, an
   invalidation of a pending key bumps its version, and ``put`` stores only if
   the version is still the one seen by ``begin``. A flush or a loss of tracking
   bumps the domain's *epoch*, which refuses every older ticket at once. An
   invalidation that arrives after ``put`` simply evicts the entry.
3. **TTL-exact.** The caller reads the PTTL with the value (one round trip), and
   the local deadline is ``min(PTTL, max_ttl)`` from ``begin`` (Redis ran the
   read after it; a slow reply must not stretch the TTL): Redis announces an
   expiry only when it gets round to deleting the key, and a lost invalidation
   we did not notice is bounded by ``max_ttl``.
4. **Our own writes** go through :meth:`NearView.invalidate`, so a request
   that writes and then reads sees its write without waiting for the
   round trip of its own invalidation.

Sharing between views, servers and event loops: see ``_domain.py``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from asgi_redis_kit.near._domain import MAX_PREFIXES, MAX_VIEWS, _Domain, _identity
from asgi_redis_kit.near._store import NearStats, Store

logger = logging.getLogger("asgi_redis_kit.near")


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"

    def __reduce__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()
"""The value of a :class:`NearHit` for a key Redis does not have."""


class NearHit(NamedTuple):
    value: object
    # loop.time() of the view's loop after which the entry is no longer served.
    expires_at: float
    # Milliseconds left until then, when get() answered (at least 1).
    remaining_ms: int


def pttl_left(pttl_ms: int) -> float:
    """The seconds surely left of a key whose PTTL read ``pttl_ms`` (> 0).

    Redis counts a PTTL from the start of its current millisecond, so the reply
    can claim up to 1 ms more than is left: a copy kept for the whole PTTL
    could outlive the key by that much."""
    return (pttl_ms - 1) / 1000


class Ticket:
    """A read in flight: the domain epoch and key versions ``begin`` saw, and
    when (``loop.time()``): Redis runs the read after that, so the PTTL it
    answers counts from no earlier than ``started``."""

    __slots__ = ("closed", "epoch", "started", "versions")

    def __init__(self, epoch: int, versions: dict[str, int], started: float) -> None:
        self.epoch = epoch
        self.versions = versions
        self.started = started
        self.closed = False


class NearCache:
    """A process-local copy of Redis keys, kept correct by Redis server-assisted
    client-side caching (see the module docstring for what is guaranteed).

    Parameters:
        max_bytes: the memory bound for all entries of all views together.
        max_entry_bytes: a larger value (the caller's size estimate) is not kept.
        max_ttl: the longest any entry is kept, in seconds, whatever its PTTL.
        heartbeat: seconds between the trackers' PINGs.
        heartbeat_timeout: a PING unanswered this long means tracking is lost.
    """

    _shared: NearCache | None = None
    _shared_lock = threading.Lock()

    def __init__(
        self,
        *,
        max_bytes: int = 64 * 2**20,
        max_entry_bytes: int = 2**20,
        max_ttl: float = 300.0,
        heartbeat: float = 1.0,
        heartbeat_timeout: float = 1.0,
    ) -> None:
        for name, value in (("max_bytes", max_bytes), ("max_entry_bytes", max_entry_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
        if max_entry_bytes > max_bytes:
            raise ValueError(
                f"max_entry_bytes ({max_entry_bytes!r}) must not exceed max_bytes ({max_bytes!r})"
            )
        for name, seconds in (
            ("max_ttl", max_ttl),
            ("heartbeat", heartbeat),
            ("heartbeat_timeout", heartbeat_timeout),
        ):
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not 0 < seconds < float("inf")
            ):
                raise ValueError(f"{name} must be a positive number of seconds, got {seconds!r}")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.max_ttl = float(max_ttl)
        self.heartbeat = float(heartbeat)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.stats = NearStats()
        self._store = Store(max_bytes, self.stats)
        self._domains: dict[tuple[asyncio.AbstractEventLoop, tuple[Any, ...]], _Domain] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<NearCache max_bytes={self.max_bytes} entries={self.stats.entries} "
            f"domains={len(self._domains)}>"
        )

    @classmethod
    def shared(cls) -> NearCache:
        """The process-wide default instance (what ``near_cache=True`` uses)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def view(self, client: Redis | RedisCluster, prefix: str) -> NearView:
        """The view of ``client``'s keys under ``prefix``, for the running loop.

        Starts tracking on first use (the view is not usable until Redis has
        confirmed it); a new prefix on a tracked server re-registers (flush).
        Past 64 prefixes on one server none of which covers ``prefix``, the
        view is never usable (its reads go to Redis) and a warning says to make
        per-tenant or per-user prefixes under a shared one: a request never
        fails for it.
        """
        if not isinstance(client, Redis | RedisCluster):
            raise TypeError(
                f"view() takes a redis.asyncio Redis or RedisCluster client, got {client!r}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r}")
        loop = asyncio.get_running_loop()
        identity = _identity(client)
        with self._lock:
            self._drop_dead()
            domain = self._domains.get((loop, identity))
            if domain is None or domain.closed:
                domain = self._domains[(loop, identity)] = _Domain(self, identity, client, loop)
            view = domain.views.get(prefix)
            if view is None:
                if not domain.add_prefix(prefix):
                    if not domain.refused_prefix:  # once per server and loop, not per request
                        domain.refused_prefix = True
                        logger.warning(
                            "near cache: more than %d key prefixes on one Redis server; %r is "
                            "not under any of them, so its reads are not kept (use a shared "
                            "prefix for per-tenant or per-user stores)",
                            MAX_PREFIXES,
                            prefix,
                        )
                    # A domain never started is never usable: every read goes to Redis.
                    # Closed too, so a caller keeping views asks again next time
                    # (the server's prefixes may have been freed by then).
                    refused = _Domain(self, identity, client, loop)
                    refused.closed = True
                    return NearView(refused, prefix)
                view = NearView(domain, prefix)
                if len(domain.views) < MAX_VIEWS:  # else a prefix per request: not kept
                    domain.views[prefix] = view
            return view

    def _drop_dead(self) -> None:
        for key, domain in list(self._domains.items()):
            if domain.loop.is_closed():
                domain.drop_dead()
                del self._domains[key]
            elif domain.closed:
                del self._domains[key]

    async def aclose(self) -> None:
        """Stop every tracker and forget every entry. Trackers of other running
        loops are cancelled there; a later ``view()`` starts afresh."""
        loop = asyncio.get_running_loop()
        with self._lock:
            domains = list(self._domains.values())
            self._domains.clear()
        for domain in domains:
            if domain.loop is loop:
                await domain.aclose()
            elif domain.loop.is_closed():
                domain.drop_dead()
            else:
                domain.closed = domain.usable = False
                for tracker in domain.trackers.values():
                    domain.loop.call_soon_threadsafe(tracker.cancel)
                if domain.watcher is not None:
                    domain.loop.call_soon_threadsafe(domain.watcher.cancel)
        self._store.clear()


class NearView:
    """One prefix of one server, as seen from one event loop. Made by
    :meth:`NearCache.view`; every method is synchronous and costs no I/O.

    Keys are full Redis keys (str); a key outside the view's prefix is never
    kept. A view outlives nothing: after :meth:`NearCache.aclose`, or once its
    loop has finished, it is never usable again; ``view()`` is a few dict
    lookups, so callers may simply ask for the view on each request."""

    __slots__ = ("_domain", "_store", "max_entry_bytes", "max_ttl", "prefix", "stats")

    def __init__(self, domain: _Domain, prefix: str) -> None:
        self._domain = domain
        self._store = domain.near._store
        self.prefix = prefix
        self.stats = domain.near.stats
        self.max_ttl = domain.near.max_ttl
        self.max_entry_bytes = domain.near.max_entry_bytes

    def __repr__(self) -> str:
        return f"<NearView {self.prefix!r} usable={self.usable}>"

    @property
    def closed(self) -> bool:
        """This view will never be usable again (its domain was closed, or its
        loop finished): ask :meth:`NearCache.view` for a new one. A caller may
        keep an open view per (client, loop) instead of asking on each request."""
        return self._domain.closed

    @property
    def usable(self) -> bool:
        """Tracking is confirmed on every node of this view's client. (``get``
        also wants it heard from within ``heartbeat + heartbeat_timeout``.)"""
        return self._domain.usable

    def get(self, key: str) -> NearHit | None:
        """The local copy of ``key``, or ``None`` (unknown here, expired, the
        view is not usable, or no tracker was heard from for ``heartbeat +
        heartbeat_timeout``: a blocked loop may have invalidations unread).
        ``NearHit.value`` is :data:`ABSENT` when Redis had no such key."""
        domain = self._domain
        now = domain.loop.time()
        if not domain.usable or now > domain.trusted_until:
            self.stats.bypasses += 1
            return None
        entry = self._store.get(domain.id, key, now)
        if entry is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return NearHit(entry.value, entry.expires_at, max(1, int((entry.expires_at - now) * 1000)))

    def get_many(self, keys: Sequence[str]) -> list[object] | None:
        """Every key's local value, in order (:data:`ABSENT` for a key Redis
        does not have), or ``None`` as soon as one of them is not here (or the
        view is not serving, as for :meth:`get`). One lock for all of them; the
        counters move as ``get`` would have moved them for the keys it read up
        to the first one missing."""
        domain = self._domain
        now = domain.loop.time()
        stats = self.stats
        if not domain.usable or now > domain.trusted_until:
            stats.bypasses += 1
            return None
        values = self._store.get_many(domain.id, keys, now)
        stats.hits += len(values)
        if len(values) < len(keys):
            stats.misses += 1
            return None
        return values

    def begin(self, keys: Sequence[str]) -> Ticket | None:
        """Call before sending the read of ``keys``; ``None`` when not usable
        (then there is nothing to ``put`` or ``end``, but both accept ``None``)."""
        domain = self._domain
        if not domain.usable:
            return None
        pending = domain.pending
        versions: dict[str, int] = {}
        for key in keys:
            if key in versions:
                continue
            state = pending.get(key)
            if state is None:
                state = pending[key] = [0, 0]
            state[0] += 1
            versions[key] = state[1]
        return Ticket(domain.epoch, versions, domain.loop.time())

    def put(self, ticket: Ticket | None, key: str, value: object, pttl_ms: int, size: int) -> None:
        """Keep ``value`` of ``key`` as read under ``ticket``, unless an
        invalidation, a flush or a loss of tracking came since ``begin``.

        ``pttl_ms`` is the key's PTTL read with the value: -2 (no such key:
        ``value`` is ignored and :data:`ABSENT` kept), -1 (no TTL: kept
        ``max_ttl``) or the milliseconds left (kept ``min(pttl, max_ttl)``).
        ``size`` is the caller's estimate of the value's bytes; above
        ``max_entry_bytes`` nothing is kept. The deadline counts from
        ``begin``, so a slow reply is kept for less, never longer.
        """
        if ticket is None or ticket.closed:
            return
        domain = self._domain
        state = domain.pending.get(key)
        if (
            not domain.usable
            or ticket.epoch != domain.epoch
            or state is None
            or ticket.versions.get(key) != state[1]
            or not key.startswith(self.prefix)
            or (domain.lossy_keys and not _round_trips(key, domain))
        ):
            self.stats.refused += 1
            return
        if size > self.max_entry_bytes:
            # Too big to keep, and any copy we hold is older than this read.
            self._store.discard(domain.id, key)
            self.stats.refused += 1
            return
        if pttl_ms == -2:
            value, ttl = ABSENT, self.max_ttl
        elif pttl_ms == -1:
            ttl = self.max_ttl
        elif pttl_ms > 0:
            ttl = min(pttl_left(pttl_ms), self.max_ttl)
        else:
            self.stats.refused += 1
            return
        # Counted from begin(), not from now: the reply may have spent most of
        # the PTTL on its way here, and Redis announces an expiry only when it
        # gets round to deleting the key.
        expires_at = ticket.started + ttl
        if expires_at <= domain.loop.time():
            self.stats.refused += 1
            return
        if self._store.put(domain.id, key, value, expires_at, size):
            self.stats.stores += 1
        else:
            self.stats.refused += 1

    def end(self, ticket: Ticket | None) -> None:
        """Release what ``begin`` registered (call it in a ``finally``)."""
        if ticket is None or ticket.closed:
            return
        ticket.closed = True
        pending = self._domain.pending
        for key in ticket.versions:
            state = pending.get(key)
            if state is None:
                continue
            state[0] -= 1
            if state[0] <= 0:
                del pending[key]

    def invalidate(self, keys: Iterable[str]) -> None:
        """We wrote ``keys``: drop them here now, as an invalidation would."""
        self._domain.on_invalidate(list(keys))


def _round_trips(key: str, domain: _Domain) -> bool:
    """``key`` is what its invalidation will decode to (see ``_Domain.lossy_keys``)."""
    encoded = key.encode(domain.encoding, domain.encoding_errors)
    return encoded.decode(domain.encoding, "surrogateescape") == key
