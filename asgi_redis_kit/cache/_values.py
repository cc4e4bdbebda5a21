"""The data cache's value API (``Cache.get``/``set``/``delete``/``exists``/
``get_many``/``set_many``/``incr``), on the response cache's machinery.

A value is an entry in the response cache's format (``_entry``) whose status
is 0, body is the serializer's bytes (``_serializers``) and headers name its
tags, under a key of its own (``KeyScheme.for_value``): its entry, lease,
record and own version share one Redis Cluster slot. A lookup reads the
entry with the namespace generation, the value's version and its tags'
versions, through the same storage layers (near cache included) and the same
``Cache.lookup`` (concurrent lookups of one key share a round trip). The
record names the value's tags, so ``get`` learns them like a vary record's
headers: a process that has not seen the key's tags reads them, then looks
up again once.

Failure policy, the same everywhere: reads fail open (``get`` returns the
default, ``exists`` False, a memoized function runs), writes raise
:class:`~asgi_redis_kit.errors.BackendUnavailable` (``set``, ``set_many``,
``delete``, ``incr``, as ``invalidate_tags`` and ``clear`` already do), so a
write that may not have happened never looks like one that did (a command sent
before a timeout can still land: the value is then the old or the new). Bad input (a key that is
not a non-empty ``str`` of at most :data:`MAX_KEY_LENGTH` characters, a TTL
that is not a positive number, a value the serializer refuses) raises
``TypeError``/``ValueError`` before any Redis call.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from .._redis import Backend, RedisClient, check_seconds
from ..errors import BackendUnavailable
from ._entry import Entry, encode_head
from ._keys import CacheKey, KeyScheme
from ._outcome import Fresh, Stale, classify
from ._serializers import Serializer
from ._stats import CacheStats
from ._storage import Lookup, Storage

MAX_KEY_LENGTH: Final = 1024
VALUE_STATUS: Final = 0
# The etag field of a value entry: what its body is.
SERIALIZED: Final = ""
COUNTER: Final = "n"
# At most this many commands of one get_many/set_many in flight: all of them at
# once would wait on the connection pool past the timeout, fail, and open the
# breaker for every other caller of the cache. Never more than the client's
# pool holds either (a caller's non-blocking pool refuses the rest at once).
MANY_AT_ONCE: Final = 8


class Missing:
    """What a value read found when there is no usable value (never a user's value)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = Missing()


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"cache keys are str, got {type(key).__name__} {key!r}")
    if not key:
        raise ValueError("a cache key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"a cache key is at most {MAX_KEY_LENGTH} characters, got {len(key)}; "
            "hash long keys yourself"
        )
    try:
        key.encode()
    except UnicodeEncodeError:
        raise ValueError(f"a cache key must be valid Unicode text, got {key!r}") from None
    return key


def check_ttl(name: str, ttl: object, *, optional: bool) -> float | None:
    if ttl is None and optional:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"{name} is a number of seconds, got {ttl!r}")
    if not (ttl >= 0.001 and math.isfinite(ttl)):
        # Below Redis's millisecond PX a value would be gone as it is stored.
        raise ValueError(f"{name} must be at least 0.001 seconds (1 ms), got {ttl!r}")
    check_seconds(name, ttl)
    return float(ttl)


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise TypeError(f"tags takes a list of tags, got the string {tags!r}")
    found = tuple(tags)
    for tag in found:
        if not isinstance(tag, str) or not tag:
            raise TypeError(f"a tag is a non-empty str, got {tag!r}")
    return found


def value_entry(
    key: CacheKey,
    body: bytes,
    *,
    now: float,
    ttl: float,
    stale_while_revalidate: float = 0.0,
    stale_if_error: float = 0.0,
    versions: tuple[int, ...] = (),
    kind: str = SERIALIZED,
) -> Entry:
    """A value's entry for ``key`` (its tags are ``key.learned``)."""
    return Entry(
        status=VALUE_STATUS,
        headers=tuple((b"tag", tag.encode()) for tag in key.learned),
        body=body,
        etag=kind,
        stored_at=now,
        fresh_for=ttl,
        stale_while_revalidate=stale_while_revalidate,
        stale_if_error=stale_if_error,
        versions=versions,
        per_user=False,
    )


def read_value(entry: Entry, key: CacheKey, serializer: Serializer) -> Any:
    """The value ``entry`` holds for ``key``, or MISSING: not a value entry, one
    stored with other tags than ``key`` read the versions of, or bytes the
    serializer cannot read (another serializer's, or an older format)."""
    if entry.status != VALUE_STATUS:
        return MISSING
    if tuple(value.decode() for _, value in entry.headers) != key.learned:
        return MISSING
    if entry.etag == COUNTER:
        return int(entry.body)
    try:
        return serializer.loads(entry.body)
    except Exception:
        return MISSING


def fan_out(client: RedisClient) -> int:
    """:data:`MANY_AT_ONCE`, or the size of ``client``'s pool if smaller (a Cluster
    client's pools are per node, and as large as it opens)."""
    pool = getattr(client, "connection_pool", None)
    size = getattr(pool, "max_connections", MANY_AT_ONCE)
    return max(1, min(MANY_AT_ONCE, size))


async def bounded(calls: Iterable[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    """``asyncio.gather`` of each of ``calls`` called, at most ``limit`` running at
    a time. Each is called once its turn comes: a coroutine made before, and
    never awaited because the gather was cancelled first, is a RuntimeWarning."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


def usable(found: Lookup, now: float) -> Entry | None:
    """A value lookup's entry if a reader may return it: fresh, or stale inside
    its revalidate window (``get`` serves what a memoized call would)."""
    match classify(found, now):
        case Fresh(entry) | Stale(entry, "revalidate"):
            return entry
        case _:
            return None


class Values:
    """The value API, mixed into :class:`~._cache.Cache`, which provides these:"""

    keys: KeyScheme
    namespace: str
    storage: Storage
    backend: Backend
    stats: CacheStats
    clock: Callable[[], float]
    max_lifetime: float
    serializer: Serializer

    # Cache.lookup: concurrent lookups of one key share a round trip.
    lookup: Callable[..., Awaitable[Lookup]]

    def value_key(self, key: str, tags: Iterable[str] | None = None) -> CacheKey:
        """The CacheKey of value ``key`` (checked) in this cache's namespace."""
        return self.keys.for_value(self.namespace, check_key(key), tags)

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when there is none (or
        Redis does not answer). A stored ``None`` is returned as ``None``."""
        value = await self._read(self.value_key(key))
        return default if value is MISSING else value

    async def exists(self, key: str) -> bool:
        """Whether :meth:`get` would find a value (False when Redis does not answer)."""
        return await self._read(self.value_key(key)) is not MISSING

    async def get_many(self, keys: Sequence[str], default: Any = None) -> list[Any]:
        """:meth:`get` of each key, concurrently; a list in the same order."""
        names = [self.value_key(key) for key in keys]
        found = await bounded(
            (functools.partial(self._read, name) for name in names), fan_out(self.backend.client)
        )
        return [default if value is MISSING else value for value in found]

    async def _read(self, key: CacheKey) -> Any:
        try:
            found = await self.lookup(key)
        except BackendUnavailable:
            self.stats.data_misses += 1
            return MISSING
        entry = usable(found, self.clock())
        value = MISSING if entry is None else read_value(entry, found.key, self.serializer)
        if value is MISSING:
            self.stats.data_misses += 1
        else:
            self.stats.data_hits += 1
        return value

    async def set(
        self, key: str, value: Any, *, ttl: float | None = None, tags: Iterable[str] = ()
    ) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``, or more
        than the cache's ``max_lifetime``: that), invalidated by any of ``tags``. One round
        trip on a single server. Raises BackendUnavailable if Redis did not
        take it; a value the serializer refuses is a TypeError, before Redis."""
        lifetime = check_ttl("ttl", ttl, optional=True) or self.max_lifetime
        name = self.value_key(key, check_tags(tags))
        body = self.serializer.dumps(value)
        head = encode_head(value_entry(name, body, now=self.clock(), ttl=lifetime))
        await self.storage.set_value(name, head, body, lifetime)
        self.keys.learn(name, name.learned)  # later reads know its tags at once
        self.stats.data_stores += 1

    async def set_many(
        self, values: Mapping[str, Any], *, ttl: float | None = None, tags: Iterable[str] = ()
    ) -> None:
        """:meth:`set` of each item, concurrently (all checked before any is sent)."""
        lifetime = check_ttl("ttl", ttl, optional=True)
        found_tags = check_tags(tags)
        for key, value in values.items():
            check_key(key)
            self.serializer.dumps(value)
        await bounded(
            (
                functools.partial(self.set, key, value, ttl=lifetime, tags=found_tags)
                for key, value in values.items()
            ),
            fan_out(self.backend.client),
        )

    async def delete(self, key: str) -> bool:
        """Remove ``key``'s value: True if one was there. A memoized call or refill
        that read the value before is never stored over the delete. Raises
        BackendUnavailable if Redis did not answer."""
        found = await self.storage.delete_value(self.value_key(key, ()))
        self.stats.invalidations["key"] += 1
        return found

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Add ``amount`` to the counter ``key`` atomically and return the new
        value; a missing counter starts at ``amount`` and lives ``ttl`` seconds
        from then (``None``: ``max_lifetime``), later increments keep that TTL.
        ``get(key)`` reads it as an ``int``. A key holding a value that is not
        a counter is a TypeError (nothing is written; a value set with tags
        stays one until deleted or expired, even once its tags are invalidated);
        past 2**53 a ValueError.
        Counters take no tags; ``delete`` and ``clear`` reset them."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"amount is an int, got {amount!r}")
        if abs(amount) >= 2**53:
            raise ValueError(f"amount must be below 2**53 in size, got {amount!r}")
        # A plain int: redis-py sends an int as its repr, and an int subclass's
        # (an IntEnum's '<Step.ONE: 1>') would fail in the script, reported as
        # Redis failing and counted towards the breaker.
        amount = int(amount)
        lifetime = check_ttl("ttl", ttl, optional=True) or self.max_lifetime
        name = self.value_key(key, ())
        head = encode_head(value_entry(name, b"", now=self.clock(), ttl=lifetime, kind=COUNTER))
        return await self.storage.incr_value(name, head, amount, lifetime)
