"""The near layer: the cache's lookups answered from process memory when the
near cache (``asgi_redis_kit.near``) holds every key they read, and every
other call handed to the Redis layer. Implements :class:`~._storage.Storage`
(``Cache(near_cache=...)`` puts it in front of ``cache.redis_layer``).

A lookup reads the entry, its URL's vary record and the version keys (and,
for a per-user entry whose session lives on the cache's own server, the
session's key). When the view of the running loop's client is usable and all
of them are known locally, and the entry is there and written under those
versions, the lookup costs no Redis command: whether it is fresh or stale is
decided in ``_outcome``, as for an entry read from Redis. Anything else
(an absent entry, whose lease must be taken in Redis; an entry of older
versions; a key not known here) is one Redis round trip that also returns
each key's PTTL, and what it read is kept: the decoded entry, the record's
header names, the versions, and a session key only when the lookup proved it
missing (the session store owns the shape of its value). ``begin`` is called
before the read is sent, so a reply overtaken by an invalidation is not kept
(``asgi_redis_kit.near._near`` says why).

Every write this layer sends (store, lease release, version bumps) drops the
written keys locally after the write, raised or not (it may have reached
Redis), so a request sees its own writes without waiting for their
invalidations to come back.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

from ..near import ABSENT, NearCache, NearView, Ticket
from ._entry import Entry
from ._keys import CacheKey, record_names
from ._redis_layer import RedisLayer
from ._stats import CacheStats
from ._storage import Lookup, ReadBack, SessionProof

# Bytes counted for a small decoded value (a version, a record's names): the
# near cache adds its own per-entry overhead to this.
_SMALL = 64


class NearLayer:
    """Lookups from the near cache ``near`` where it can answer, the rest from
    ``inner``; ``prefix`` is the cache's key prefix (the tracked prefix)."""

    def __init__(
        self, inner: RedisLayer, near: NearCache, *, prefix: str, stats: CacheStats
    ) -> None:
        self.inner = inner
        self.near = near
        self.prefix = prefix
        self.stats = stats
        # The last view asked for, with its loop and client: reused while it
        # is open (one layer usually serves one loop, so this is every request).
        self._kept: tuple[asyncio.AbstractEventLoop, object, NearView] | None = None

    def view(self) -> NearView:
        """The view of the running loop's client."""
        loop = asyncio.get_running_loop()
        client = self.inner.backend.client
        kept = self._kept
        if kept is not None and kept[0] is loop and kept[1] is client and not kept[2].closed:
            return kept[2]
        view = self.near.view(client, self.prefix)
        self._kept = (loop, client, view)
        return view

    # -- lookups -----------------------------------------------------------------------

    async def lookup(self, key: CacheKey, *, lease: bool, session: SessionProof | None) -> Lookup:
        view = self.view()
        found = _local(view, key, session)
        if found is not None:
            self.stats.near_hits += 1
            return found
        if not view.usable:
            return await self.inner.lookup(key, lease=lease, session=session)
        self.stats.near_misses += 1
        names = [key.entry, key.vary_record, *key.version_keys]
        own_session = (
            session is not None and session.backend is None and session.key.startswith(self.prefix)
        )
        # Registered before the read is sent: an invalidation overtaking the
        # reply then makes put() refuse it.
        ticket = view.begin([*names, session.key] if own_session and session else names)
        try:
            found, read = await self.inner.lookup_reading(
                key, lease=lease, session=session, ttls=ticket is not None
            )
            if read is not None:
                # put() counts each PTTL from begin(), before the read was sent,
                # so no local deadline falls after Redis's.
                _keep(view, ticket, names, read)
                if own_session and session and not read.alive:
                    view.put(ticket, session.key, ABSENT, -2, _SMALL)
            return found
        finally:
            view.end(ticket)

    async def poll(self, key: CacheKey, versions: tuple[int, ...]) -> Lookup:
        # The lease lives only in Redis, and a poll waits on it.
        return await self.inner.poll(key, versions)

    async def acquire(
        self, key: CacheKey, versions: tuple[int, ...]
    ) -> tuple[str | None, Entry | None]:
        try:
            return await self.inner.acquire(key, versions)
        finally:
            self._wrote([key.lock])

    # -- writes: each drops what it wrote here ----------------------------------------

    async def release(self, key: CacheKey, token: str) -> None:
        try:
            await self.inner.release(key, token)
        finally:
            self._wrote([key.lock])

    async def store(
        self, target: CacheKey, leased: CacheKey, entry: Entry, token: str | None
    ) -> None:
        try:
            await self.inner.store(target, leased, entry, token)
        finally:
            self._wrote([target.entry, target.vary_record, leased.lock])

    async def set_value(self, key: CacheKey, head: bytes, body: bytes, lifetime: float) -> None:
        try:
            await self.inner.set_value(key, head, body, lifetime)
        finally:
            self._wrote(_value_keys(key))

    async def incr_value(self, key: CacheKey, head: bytes, amount: int, lifetime: float) -> int:
        try:
            return await self.inner.incr_value(key, head, amount, lifetime)
        finally:
            self._wrote(_value_keys(key))

    async def delete_value(self, key: CacheKey) -> bool:
        try:
            return await self.inner.delete_value(key)
        finally:
            self._wrote(_value_keys(key))

    async def bump(self, names: list[str]) -> None:
        try:
            await self.inner.bump(names)
        finally:
            self._wrote(names)

    async def bump_generation(self, name: str) -> int:
        try:
            return await self.inner.bump_generation(name)
        finally:
            self._wrote([name])

    def _wrote(self, keys: Sequence[str]) -> None:
        self.view().invalidate(keys)

    async def aclose(self) -> None:
        # The NearCache may be shared (NearCache.shared()): its owner closes it.
        await self.inner.aclose()


def _value_keys(key: CacheKey) -> list[str]:
    """What a data-cache write may change: the entry, its version and its record."""
    return [key.entry, key.url_version, key.vary_record]


def _local(view: NearView, key: CacheKey, session: SessionProof | None) -> Lookup | None:
    """The lookup answered from ``view`` alone, or None: ask Redis."""
    if not view.usable:
        return None
    if session is not None and session.backend is not None:
        return None  # the session lives on another server: only it can say
    # Every key this lookup reads, under one lock: the entry, its record, the
    # versions, and the session's key last.
    names = key.local_names if session is None else (*key.local_names, session.key)
    values = view.get_many(names)
    if values is None:
        return None
    entry = values[0]
    if not isinstance(entry, Entry):
        return None  # absent: the lease is taken in Redis
    record = () if values[1] is ABSENT else values[1]
    if not isinstance(record, tuple):
        return None
    versions: list[int] = []
    for value in values[2 : 2 + len(key.tag_versions) + 2]:
        version = 0 if value is ABSENT else value
        if not isinstance(version, int):
            return None
        versions.append(version)
    found_versions = tuple(versions)
    if session is not None and values[-1] is ABSENT:
        return Lookup(key, None, found_versions, session_gone=True, record=record)
    if record != key.learned:
        # Not this request's variant: the caller looks up the one the record
        # names (Redis takes no lease then either).
        return Lookup(key, None, found_versions, record=record)
    if entry.versions != found_versions:
        return None  # written under older versions: a miss, whose lease is in Redis
    return Lookup(key, entry, found_versions, record=record)


def _keep(view: NearView, ticket: Ticket | None, names: list[str], read: ReadBack) -> None:
    """Put what one Redis lookup read: decoded, never the request's own data."""
    put = functools.partial(view.put, ticket)

    entry_raw = read.values[0]
    if entry_raw is None:
        put(names[0], ABSENT, read.pttls[0], _SMALL)
    elif read.entry is not None:
        put(names[0], read.entry, read.pttls[0], len(entry_raw))
    record_raw = read.values[1]
    record = ABSENT if record_raw is None else record_names(record_raw)
    put(names[1], record, read.pttls[1], _SMALL + len(record_raw or b""))
    for name, raw, pttl in zip(names[2:], read.values[2:], read.pttls[2:], strict=True):
        if raw is None:
            put(name, ABSENT, pttl, _SMALL)
            continue
        try:
            version = int(raw)
        except ValueError:
            continue  # not ours; the Redis layer reads it as it is each time
        put(name, version, pttl, _SMALL)
