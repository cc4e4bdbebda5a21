"""The storage layers' interface: :class:`Storage`, what a lookup found
(:class:`Lookup`) and what a per-user lookup must prove (:class:`SessionProof`).

A Cache holds one Storage as ``cache.storage``: the Redis layer
(``_redis_layer``), or with ``near_cache=`` the near layer (``_near_layer``:
in-process copies) wrapping it, which implements the same methods and hands
what it cannot answer to the Redis layer, so nothing above this interface
changes with it. The Redis layer also reports what a lookup read key by key
(:class:`ReadBack`), which the near layer keeps.
What a Lookup *means* for a request (fresh, stale, absent, session gone) is
decided in one place, ``_outcome``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .._redis import Backend
from ._entry import Entry
from ._keys import CacheKey


@dataclass(frozen=True, slots=True)
class Lookup:
    """What one lookup found: the entry if it is still valid for the current
    namespace/URL/tag versions, and those versions (stored with a new entry).

    ``key`` is the key it looked up: the request's variant as the URL's vary
    record names it, which every later step (lease, poll, store) uses.

    A lookup that asked for the lease and found no entry key also says whether
    it took the lease (``token``: the caller now owns it and must release it or
    store with it) or found it held by someone else (``locked``)."""

    key: CacheKey
    entry: Entry | None
    versions: tuple[int, ...]
    token: str | None = None
    locked: bool = False
    # The session a per-user entry belongs to no longer exists (``entry`` is None).
    session_gone: bool = False
    # The header names the URL's vary record held when it was read.
    record: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionProof:
    """What a ``vary_on_session`` lookup must prove still exists: the Redis key of
    the session the request's cookie names, and the session store's backend
    (``None`` when it is the cache's own Redis server: then the proof rides in
    the lookup's round trip)."""

    key: str
    backend: Backend | None = None


@dataclass(frozen=True, slots=True)
class ReadBack:
    """What one Redis lookup read, for a near layer to keep: the raw values of
    the entry, the vary record and each version key, in that order, their
    PTTLs read in the same round trip (-2: no such key, -1: no TTL), the entry
    decoded (None: absent, or not ours), and whether the session the lookup
    had to prove exists (True when none was asked about)."""

    values: list[bytes | None]
    pttls: list[int]
    entry: Entry | None
    alive: bool


class Storage(Protocol):
    """What the Cache asks of its storage. Every method may raise
    :class:`~asgi_redis_kit.errors.BackendUnavailable`."""

    async def lookup(self, key: CacheKey, *, lease: bool, session: SessionProof | None) -> Lookup:
        """``key``'s entry if valid for the current versions, its vary record,
        and (``lease``) the stampede lease when the entry is absent, in one
        round trip where the layer can. A per-user lookup (``session``) only
        returns an entry whose session still exists."""
        ...

    async def poll(self, key: CacheKey, versions: tuple[int, ...]) -> Lookup:
        """The entry, and (``locked``) whether someone holds its lease."""
        ...

    async def acquire(
        self, key: CacheKey, versions: tuple[int, ...]
    ) -> tuple[str | None, Entry | None]:
        """Take the lease: (token, the valid entry there at that moment, if any),
        or (None, None) when someone else holds it."""
        ...

    async def release(self, key: CacheKey, token: str) -> None:
        """Give the lease ``token`` back (if it is still ours)."""
        ...

    async def store(
        self, target: CacheKey, leased: CacheKey, entry: Entry, token: str | None
    ) -> None:
        """Store ``entry`` under ``target`` (and its vary record) for its lifetime,
        and release the lease ``token`` of ``leased``, the key the caller looked
        up. A data entry is stored only while its own version (its versions'
        second, read by the caller's lookup) is still the one in Redis."""
        ...

    async def set_value(self, key: CacheKey, head: bytes, body: bytes, lifetime: float) -> None:
        """Write a data entry (its meta ``head`` up to the versions, then
        ``body``) under the current versions, bumping the value's own."""
        ...

    async def incr_value(self, key: CacheKey, head: bytes, amount: int, lifetime: float) -> int:
        """Add ``amount`` to the counter at ``key`` (a new one: ``head``); the result."""
        ...

    async def delete_value(self, key: CacheKey) -> bool:
        """Invalidate and drop the data entry; whether one was there."""
        ...

    async def bump(self, names: list[str]) -> None:
        """Increment version counters (invalidation)."""
        ...

    async def bump_generation(self, name: str) -> int:
        """Increment a namespace generation (``clear()``); the new value."""
        ...

    async def aclose(self) -> None: ...
