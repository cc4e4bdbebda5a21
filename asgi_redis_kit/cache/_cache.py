"""The Cache: Redis access, counters and invalidation, usable with or without requests.

Invalidation uses version counters, checked on read, not sets of entry keys:

* every entry records the versions it was stored under: the namespace
  generation, its URL's version and one version per tag;
* a lookup reads the entry, its URL's vary record (``_keys``) and the current
  versions in one round trip (a script on a single server, which also takes
  the stampede lease when the entry is absent; one pipelined GET per key on
  Redis Cluster, which stays correct while slots migrate), and an entry whose
  versions differ is a miss;
* ``clear()``, ``invalidate(url)`` and ``invalidate_tags()`` are one INCR per
  name - O(1), no KEYS/SCAN, no set that grows with cache-busting URLs.

Compared with a Redis set of entry keys per tag, nothing has to be deleted
entry by entry, and there is no race in which an invalidation landing between
a handler run and its SADD leaves a stale entry behind: an entry stored with
versions read before the invalidation never matches again. Invalidated
entries stay in Redis until their TTL ends (memory, not correctness).

The namespace generation is read on every lookup rather than cached in the
process, so ``clear()`` takes effect at once on every worker for no extra
round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any
from urllib.parse import unquote

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MaxConnectionsError
from starlette.datastructures import URL
from starlette.requests import HTTPConnection

from .._redis import Backend, RedisClient, RedisLike, check_seconds
from ..errors import BackendUnavailable
from ._breaker import CircuitBreaker
from ._entry import Entry, decode
from ._keys import CacheKey, KeyScheme, record_names
from ._lock import (
    ACQUIRE,
    LOOKUP,
    RELEASE,
    STORE_AND_RELEASE,
    SingleFlight,
    new_token,
)
from ._policy import DEFAULT_CACHEABLE_STATUSES
from ._request import request_host

logger = logging.getLogger("asgi_redis_kit.cache")

DEFAULT_MAX_LIFETIME = 7 * 24 * 3600
# Seconds before its expected expiry at which an entry counts as maybe gone (clock
# skew between workers, rounding of PX).
_EXPIRY_MARGIN = 1.0
_PRESENT_MEMO = 4096


@dataclass
class CacheStats:
    """Counters since the Cache was created. Plain ints and Counters: read them,
    reset them with :meth:`reset`, export them to your metrics system."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    not_modified: int = 0
    stores: int = 0
    refreshes: int = 0
    errors: int = 0
    #: answered with another request's response, in flight while Redis failed
    coalesced: int = 0
    bypass: Counter[str] = field(default_factory=Counter)
    not_stored: Counter[str] = field(default_factory=Counter)

    def reset(self) -> None:
        self.hits = self.misses = self.stale = self.not_modified = 0
        self.stores = self.refreshes = self.errors = self.coalesced = 0
        self.bypass.clear()
        self.not_stored.clear()

    def as_dict(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "stale": self.stale,
            "not_modified": self.not_modified,
            "stores": self.stores,
            "refreshes": self.refreshes,
            "errors": self.errors,
            "coalesced": self.coalesced,
            "bypass": dict(self.bypass),
            "not_stored": dict(self.not_stored),
        }


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


@dataclass(eq=False, slots=True)
class _SharedLookup:
    """A lookup round trip in progress. Requests for the same key that arrive
    meanwhile wait on ``outcome`` (made when the first of them arrives) instead
    of sending their own: the found Lookup (never its lease token), the
    BackendUnavailable it raised, or None (it was cancelled: look up yourself)."""

    outcome: asyncio.Future[Lookup | BackendUnavailable | None] | None = None


class _Guarded:
    """What ``Cache._redis()`` returns. A class, not ``@asynccontextmanager``: it
    wraps every Redis call of every request, hits included."""

    __slots__ = ("_cache", "_call")
    _call: AbstractAsyncContextManager[RedisClient]

    def __init__(self, cache: Cache) -> None:
        self._cache = cache

    async def __aenter__(self) -> RedisClient:
        if not self._cache.breaker.allow():
            raise BackendUnavailable("the cache's circuit breaker is open")
        self._call = self._cache.backend.call()
        try:
            return await self._call.__aenter__()
        except BaseException as exc:
            self._cache._settle(exc)
            raise

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        try:
            suppressed = bool(await self._call.__aexit__(kind, exc, traceback))
        except BaseException as raised:
            self._cache._settle(raised)
            raise
        self._cache._settle(None if suppressed else exc)
        return suppressed


async def _session_exists(key: str, backend: Backend) -> bool:
    """Whether the session store still holds ``key``. A store that does not
    answer proves nothing: the entry is not served (the app runs instead)."""
    try:
        async with backend.call() as client:
            return bool(await client.exists(key))
    except BackendUnavailable:
        return False


def _versions(raw: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(value) if value is not None else 0 for value in raw)


class Cache:
    """The response cache's backend, counters and invalidation API.

    CacheMiddleware creates one; ``get_cache(request)`` returns it. Create one
    yourself (same ``redis``, ``key_prefix``) in an admin script to invalidate
    what the app cached::

        async with Cache("redis://localhost:6379/0") as cache:
            await cache.invalidate_tags("item:42")

    Parameters:
        redis: a URL (``redis://``, ``rediss://``, ``unix://``, ``memory://``) or a
            ready ``redis.asyncio.Redis``/``RedisCluster`` (left open for you).
        key_prefix: prefix of every Redis key the cache writes.
        namespace: namespace of routes that do not name one; :meth:`clear` empties
            one namespace in O(1).
        timeout: deadline in seconds for each Redis round trip. Short on purpose:
            the cache fails open, so waiting longer only slows the response.
        max_connections: pool size of a client made from a URL.
        allowed_hosts: hosts whose responses may be cached (``"example.com"``,
            ``"*.example.com"``); ``None`` caches any host, each under its own key.
        cacheable_statuses: response statuses that may be stored.
        session_cookie: name of the session cookie (see ``vary_on_session``).
            ``None`` (the default): CacheMiddleware uses the cookie of the
            SessionMiddleware it finds in the app, else ``"session"``. A name
            given here that differs from that SessionMiddleware's cookie is an
            error (``ValueError`` on the first request).
        breaker_threshold, breaker_cooldown: consecutive Redis failures that open
            the circuit breaker, and seconds before it lets a probe through.
        lock_lease: seconds a leader holds the stampede lease (outlive your slowest handler).
        lock_wait: seconds a request waits for another one filling the same key
            before it runs the handler itself.
        max_lifetime: upper bound, in seconds, of any entry's life in Redis.
        clock: wall-clock seconds (``time.time``); stored-at times are compared
            across workers, so it must be a real clock outside tests.
    """

    def __init__(
        self,
        redis: RedisLike = "redis://localhost:6379/0",
        *,
        key_prefix: str = "ark:c:",
        namespace: str = "default",
        timeout: float = 0.5,
        max_connections: int = 64,
        allowed_hosts: Sequence[str] | None = None,
        cacheable_statuses: Iterable[int] = DEFAULT_CACHEABLE_STATUSES,
        session_cookie: str | None = None,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 5.0,
        lock_lease: float = 10.0,
        lock_wait: float = 5.0,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not key_prefix:
            raise ValueError("key_prefix must not be empty: it keeps cache keys apart from others")
        if not namespace:
            raise ValueError("namespace must be a non-empty string")
        if isinstance(allowed_hosts, str):
            raise TypeError(
                f"allowed_hosts takes a list of hosts, got the string {allowed_hosts!r}"
            )
        if lock_lease <= 0 or lock_wait < 0 or max_lifetime <= 0:
            raise ValueError("lock_lease and max_lifetime must be positive, lock_wait >= 0")
        for name, value in (
            ("lock_lease", lock_lease),
            ("lock_wait", lock_wait),
            ("max_lifetime", max_lifetime),
        ):
            check_seconds(name, value)
        self.backend = Backend(redis, timeout=timeout, max_connections=max_connections)
        self.keys = KeyScheme(key_prefix)
        self.namespace = namespace
        self.allowed_hosts = None if allowed_hosts is None else [h.lower() for h in allowed_hosts]
        self.cacheable_statuses = frozenset(cacheable_statuses)
        self.session_cookie = session_cookie
        self.breaker = CircuitBreaker(
            threshold=breaker_threshold, cooldown=breaker_cooldown, clock=clock
        )
        self.lock_lease = lock_lease
        self.lock_wait = lock_wait
        self.max_lifetime = max_lifetime
        self.clock = clock
        self.stats = CacheStats()
        self.flights = SingleFlight()
        self._background: set[asyncio.Task[None]] = set()
        self._lookups: dict[tuple[str, bool], _SharedLookup] = {}
        client = self.backend.client
        # On Cluster the version keys live in other slots than the entry: no script
        # can read them with it, so a miss takes its lease in a round trip of its own.
        self._lease_in_lookup = not isinstance(client, RedisCluster)
        # Entry keys seen lately, and when Redis drops them (our clock). A key
        # expected to be there is looked up with a plain MGET: Redis runs a script
        # ~10x slower than MGET, and a hit has no lease to take. Only a hint: a
        # key that is gone after all is a miss that takes its lease separately.
        self._present: dict[str, float] = {}
        self._lookup_script = client.register_script(LOOKUP)
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._store = client.register_script(STORE_AND_RELEASE)

    def __repr__(self) -> str:
        return f"<Cache namespace={self.namespace!r} breaker={self.breaker.state}>"

    async def __aenter__(self) -> Cache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- Redis access, guarded by the breaker -------------------------------------------

    def _redis(self) -> _Guarded:
        """``async with self._redis() as client``: one Redis call, bounded by the
        backend's deadline, failures translated and fed to the breaker."""
        return _Guarded(self)

    def _settle(self, exc: BaseException | None) -> None:
        """Tell the breaker how a call through :meth:`_redis` ended."""
        if exc is None:
            self.breaker.success()
        elif isinstance(exc, BackendUnavailable):
            self.stats.errors += 1
            if isinstance(exc.__cause__, MaxConnectionsError):
                # Our own pool is full (a burst on a caller's non-blocking pool):
                # Redis is fine, so this request skips the cache but the
                # breaker stays closed for everyone else.
                self.breaker.abandon()
            else:
                self.breaker.failure()
        else:
            self.breaker.abandon()

    async def _mget(
        self, client: RedisClient, keys: list[str], *, exists_last: bool = False
    ) -> list[Any]:
        """GET of every key (``exists_last``: EXISTS of the last one), one round trip."""
        if isinstance(client, RedisCluster):
            # Entry, namespace and tag keys live in different slots on purpose
            # (spreading load). One GET per key, pipelined: redis-py sends one
            # pipeline per node, the round trips of MGET across slots. Not MGET:
            # while a slot migrates, a command on several of its keys gets TRYAGAIN
            # until the move ends, where a single-key one gets ASK, which redis-py
            # follows.
            pipe = client.pipeline()
            for name in keys[:-1] if exists_last else keys:
                pipe.get(name)
            if exists_last:
                pipe.exists(keys[-1])
            return list(await pipe.execute())
        if exists_last:
            # Not reached today (a single server proves sessions in the LOOKUP script).
            batch = client.pipeline(transaction=False)
            batch.mget(keys[:-1])
            batch.exists(keys[-1])
            values, exists = await batch.execute()
            return [*values, exists]
        return list(await client.mget(keys))

    def _valid(self, raw: bytes | None, versions: tuple[int, ...]) -> Entry | None:
        if raw is None:
            return None
        entry = decode(raw)
        if entry is None or entry.versions != versions:
            return None  # written under an older namespace/URL/tag version
        return entry

    async def lookup(
        self, key: CacheKey, *, lease: bool = False, session: SessionProof | None = None
    ) -> Lookup:
        """Entry and versions in one round trip; with ``lease=True`` on a single
        server (not Cluster), also the stampede lease when the entry key is
        absent (then the caller owns ``token``: it stores with it or releases it).

        The same round trip reads the URL's vary record. When it names other
        request headers than ``key`` was built with (this process had not met
        the URL yet, or another one learned more since), ``key`` is not this
        request's variant: the lookup is repeated once with the variant the
        record names (the first took no lease), and the names are remembered.
        The returned ``key`` is the one finally looked up.

        ``session``: the entry is one user's; it is only returned if that
        session still exists (else ``session_gone``). On the cache's own server
        that is checked in the same round trip (the same script on a single
        server, one more pipelined command on Cluster); on another server, by
        an EXISTS sent concurrently to the session store.

        Concurrent lookups of one key in this process share that round trip: a
        burst on a hot key costs Redis one command, and cannot exhaust the
        connection pool (which would open the breaker for every other key). The
        first request sends it from its own task (no task per lookup) and alone
        gets the lease token; the others wait for its outcome and never see the
        token. If that first request is cancelled, the others look up for
        themselves, and a lease its script may have taken is released."""
        found = await self._shared_lookup(key, lease, session)
        if found.record == key.learned or found.session_gone:
            return found
        # Each request derives the variant from its own header values.
        return await self._shared_lookup(self.keys.learn(key, found.record), lease, session)

    async def _shared_lookup(
        self, key: CacheKey, lease: bool, session: SessionProof | None
    ) -> Lookup:
        name = (key.entry, lease)
        flight = self._lookups.get(name)
        if flight is not None:
            # A per-user entry's key names its session, so joiners share the proof.
            return await self._join(key, lease, flight, session)
        flight = self._lookups[name] = _SharedLookup()
        token = new_token() if lease and self._may_be_absent(key) else ""
        outcome: Lookup | BackendUnavailable | None = None
        try:
            found = await self._lookup(key, token, session)
            outcome = found if found.token is None else replace(found, token=None)
            return found
        except BackendUnavailable as exc:
            outcome = exc
            raise
        except asyncio.CancelledError:
            if token:
                self.spawn(self._release_quietly(key, token))
            raise
        finally:
            del self._lookups[name]
            if flight.outcome is not None:
                flight.outcome.set_result(outcome)

    def _may_be_absent(self, key: CacheKey) -> bool:
        """Whether a lease-taking lookup script is worth it for ``key``."""
        if not self._lease_in_lookup:
            return False
        until = self._present.get(key.entry)
        return until is None or self.clock() >= until - _EXPIRY_MARGIN

    def _remember(self, key: CacheKey, lifetime: float | None, stored_at: float = 0.0) -> None:
        """Note that ``key``'s entry is in Redis for ``lifetime`` seconds from
        ``stored_at`` (None: it is not)."""
        if lifetime is None:
            self._present.pop(key.entry, None)
            return
        if len(self._present) >= _PRESENT_MEMO:
            self._present.clear()
        self._present[key.entry] = stored_at + min(lifetime, self.max_lifetime)

    async def _join(
        self, key: CacheKey, lease: bool, flight: _SharedLookup, session: SessionProof | None
    ) -> Lookup:
        if flight.outcome is None:
            flight.outcome = asyncio.get_running_loop().create_future()
        # shield: one cancelled request must not cancel what the others wait on.
        outcome = await asyncio.shield(flight.outcome)
        if outcome is None:
            return await self._shared_lookup(key, lease, session)
        if isinstance(outcome, BackendUnavailable):
            raise BackendUnavailable(*outcome.args) from outcome
        # Same entry name, other request: a variant is derived from this one's headers.
        return replace(outcome, key=key)

    async def _release_quietly(self, key: CacheKey, token: str) -> None:
        with contextlib.suppress(BackendUnavailable):
            await self.release(key, token)

    async def _lookup(
        self, key: CacheKey, token: str, session: SessionProof | None = None
    ) -> Lookup:
        """One round trip; ``token``: take the lease with it if the entry is absent."""
        if session is not None and session.backend is not None:
            # The session lives on another server: ask it at the same time.
            found, alive = await asyncio.gather(
                self._lookup(key, token), _session_exists(session.key, session.backend)
            )
            return found if alive else replace(found, entry=None, session_gone=True)
        alive = True
        async with self._redis() as client:
            # On one server the lookup script also proves the session still exists.
            single = not isinstance(client, RedisCluster)
            session_keys = [session.key] if session is not None and single else []
            if token or session_keys:
                # One atomic step: the entry, its vary record and versions, and the
                # lease if the entry key is absent (a cold miss then needs no round
                # trip of its own for it).
                raw = await self._lookup_script(
                    keys=[key.entry, key.lock, key.vary_record, *session_keys, *key.version_keys],
                    args=[
                        token,
                        int(self.lock_lease * 1000),
                        len(session_keys),
                        key.record_value,
                    ],
                    client=client,
                )
                alive = int(raw.pop()) == 1
                leased = int(raw.pop())
            else:
                names = [key.entry, key.vary_record, *key.version_keys]
                if session is not None:
                    # Cluster: the session key is in another slot; one more command
                    # in the same pipeline (see _mget).
                    raw = await self._mget(client, [*names, session.key], exists_last=True)
                    alive = int(raw.pop()) == 1
                else:
                    raw = await self._mget(client, names)
                leased = 0
        versions = _versions(raw[2:])
        record = record_names(raw[1])
        if not alive:
            return Lookup(key, None, versions, session_gone=True, record=record)
        entry = self._valid(raw[0], versions)
        if entry is None:
            self._remember(key, None)
        else:
            self._remember(key, entry.lifetime, entry.stored_at)
        if leased == 1:
            return Lookup(key, entry, versions, token=token, record=record)
        return Lookup(key, entry, versions, locked=leased == -1, record=record)

    async def poll(self, key: CacheKey, versions: tuple[int, ...]) -> tuple[Entry | None, bool]:
        """The entry, and whether someone still holds its lease."""
        async with self._redis() as client:
            raw = await self._mget(client, [key.entry, key.lock])
        return self._valid(raw[0], versions), raw[1] is not None

    async def acquire(
        self, key: CacheKey, versions: tuple[int, ...]
    ) -> tuple[str | None, Entry | None]:
        """Take the lease: (token, None), or (None, a fresh entry stored meanwhile by
        another leader), or (None, None) if someone else holds it."""
        token = new_token()
        lease_ms = int(self.lock_lease * 1000)
        async with self._redis() as client:
            if isinstance(client, RedisCluster):
                # Single-key commands, one pipeline (same slot, same node), for the
                # reason given in _mget. The GET still follows the SET, except while
                # the slot migrates (an ASKed SET is re-sent after the pipeline): then
                # a leader storing in between can cost one extra handler run.
                pipe = client.pipeline()
                pipe.set(key.lock, token, nx=True, px=lease_ms)
                pipe.get(key.entry)
                got, raw = await pipe.execute()
            else:
                got, raw = await self._acquire(
                    keys=[key.lock, key.entry], args=[token, lease_ms], client=client
                )
        if not got:
            return None, None
        entry = self._valid(raw, versions)
        if entry is not None and entry.is_fresh(self.clock()):
            await self.release(key, token)
            return None, entry
        return token, None

    async def release(self, key: CacheKey, token: str) -> None:
        async with self._redis() as client:
            await self._release(keys=[key.lock], args=[token], client=client)

    async def store(
        self,
        key: CacheKey,
        value: bytes,
        lifetime: float,
        token: str | None,
        *,
        vary: Sequence[str] = (),
    ) -> None:
        """Store ``value`` for ``key`` and release its lease ``token``.

        ``vary``: the request headers the response varies on that ``key`` does
        not hold yet (learned from its ``Vary``). The entry then goes under the
        variant keyed on them as well, and the URL's vary record names them all,
        in the same round trip."""
        target = key
        if not set(vary) <= set(key.learned):
            target = self.keys.learn(key, sorted({*key.learned, *vary}))
        px = max(1, int(min(lifetime, self.max_lifetime) * 1000))
        async with self._redis() as client:
            if isinstance(client, RedisCluster):
                # Single-key commands, one pipeline (see _mget): the SETs, then the
                # token-checked release.
                pipe = client.pipeline()
                pipe.set(target.entry, value, px=px)
                if target.learned:
                    pipe.set(target.vary_record, target.record_value, px=px)
                if token:
                    pipe.eval(RELEASE, 1, key.lock, token)
                await pipe.execute()
            else:
                await self._store(
                    keys=[target.entry, key.lock, target.vary_record],
                    args=[value, px, token or "", target.record_value],
                    client=client,
                )
        self._remember(target, lifetime, self.clock())
        self.stats.stores += 1

    # -- invalidation ----------------------------------------------------------------------

    async def _bump(self, keys: list[str]) -> None:
        # Versions outlive every entry written under them, so an expired version
        # key can never bring back an entry stored before the bump.
        px = int((self.max_lifetime + 60) * 1000)
        async with self._redis() as client:
            pipe = client.pipeline(transaction=not isinstance(client, RedisCluster))
            for name in keys:
                pipe.incr(name)
                pipe.pexpire(name, px)
            await pipe.execute()

    async def invalidate_tags(self, *tags: str) -> int:
        """Invalidate every entry stored with any of ``tags`` (filled templates, e.g.
        ``"item:42"``), in every namespace. O(1) per tag: one INCR, no SCAN.
        Returns the number of tags bumped (version counters, not entries)."""
        if tags:
            await self._bump([self.keys.tag_version(tag) for tag in tags])
        return len(tags)

    async def invalidate(
        self, url: str | URL | HTTPConnection, *, namespace: str | None = None
    ) -> int:
        """Invalidate every entry of one path in ``namespace`` (default: the cache's):
        every query string, GET and HEAD, every variant (``vary=`` or learned
        from the response's ``Vary``) and every user's entry of that host and path.

        ``url`` is an absolute URL (``"https://example.com/items/1"``; a query is
        ignored) or a Request for it. One INCR, no SCAN. Returns the number of
        URLs invalidated (always 1), as :meth:`invalidate_tags` returns the
        number of tags: version counters bumped, not entries (nobody counts
        them)."""
        if isinstance(url, HTTPConnection):
            host = request_host(url.scope)
            path = url.scope.get("path", "")
        else:
            parsed = url if isinstance(url, URL) else URL(url)
            if not parsed.netloc:
                raise ValueError(
                    f"invalidate() needs an absolute URL with a host, got {str(url)!r}; "
                    "pass e.g. 'https://example.com/items/1' or the Request"
                )
            host = parsed.netloc.lower().rsplit("@", 1)[-1]
            path = unquote(parsed.path) or "/"
        url_id = self.keys.url_id(namespace or self.namespace, host, path)
        await self._bump([self.keys.url_version(url_id)])
        return 1

    async def clear(self, namespace: str | None = None) -> int:
        """Drop every entry of ``namespace`` (default: the cache's) in O(1) by bumping
        its generation; old entries expire on their own. Returns the new generation."""
        async with self._redis() as client:
            generation = await client.incr(self.keys.generation(namespace or self.namespace))
        return int(generation)

    # -- lifecycle ----------------------------------------------------------------------

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_background(self) -> None:
        """Wait for background refreshes (stale-while-revalidate) to finish."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel background refreshes and close the client if we made it."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.backend.aclose()
