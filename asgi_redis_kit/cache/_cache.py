"""The Cache: the public API (counters, invalidation, lifecycle) and the
single-flight of lookups, usable with or without requests. Every Redis
command is the storage layer's (``cache.storage``, ``_redis_layer``).

Invalidation uses version counters, checked on read, not sets of entry keys:

* every entry records the versions it was stored under: the namespace
  generation, its URL's version and one version per tag;
* a lookup reads the entry, its URL's vary record (``_keys``) and the current
  versions in one round trip (``_redis_layer`` says how on a single server
  and on Cluster), and an entry whose versions differ is a miss;
* ``clear()``, ``invalidate(url)`` and ``invalidate_tags()`` are one version bump
  (``_scripts.BUMP``) per name - O(1), no KEYS/SCAN, no set that grows with cache-busting URLs.

Compared with a Redis set of entry keys per tag, nothing has to be deleted
entry by entry, and there is no race in which an invalidation landing between
a handler run and its SADD leaves a stale entry behind: an entry stored with
versions read before the invalidation never matches again. Invalidated
entries stay in Redis until their TTL ends (memory, not correctness).

The namespace generation is read on every lookup rather than cached in the
process, so ``clear()`` takes effect at once on every worker for no extra
round trip. With ``near_cache=`` the entry, the vary record and the versions
may be read from process memory instead (``_near_layer``): kept correct by
Redis's invalidations, so ``clear()`` and the INCRs still reach every worker,
within the invalidation's delivery, and this process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, ParamSpec, TypeVar
from urllib.parse import unquote

from starlette.datastructures import URL
from starlette.requests import HTTPConnection

from .._redis import RedisLike, check_seconds
from ..errors import BackendUnavailable
from ..near import NearCache
from ..near._fit import near_for, near_option
from ._breaker import CircuitBreaker
from ._entry import Entry
from ._keys import CacheKey, KeyScheme
from ._lock import SingleFlight
from ._memo import Memoized, check_options
from ._near_layer import NearLayer
from ._outcome import Fresh, classify
from ._policy import DEFAULT_CACHEABLE_STATUSES
from ._redis_layer import RedisLayer
from ._request import request_host
from ._serializers import JsonSerializer, Serializer
from ._stats import CacheStats
from ._storage import Lookup, SessionProof, Storage
from ._values import Values, check_tags

__all__ = ["DEFAULT_MAX_LIFETIME", "Cache", "CacheStats", "Lookup", "SessionProof"]

DEFAULT_MAX_LIFETIME = 7 * 24 * 3600

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("asgi_redis_kit.cache")


@dataclass(eq=False, slots=True)
class _SharedLookup:
    """A lookup round trip in progress. Requests for the same key that arrive
    meanwhile wait on ``outcome`` (made when the first of them arrives) instead
    of sending their own: the found Lookup (never its lease token), the
    BackendUnavailable it raised, or None (it was cancelled: look up yourself)."""

    outcome: asyncio.Future[Lookup | BackendUnavailable | None] | None = None


def _for_joiners(
    outcome: Lookup | BackendUnavailable | None,
) -> Lookup | BackendUnavailable | None:
    """What a shared lookup hands the requests that joined it: never the lease
    token, which only its first request owns. Made only when someone joined
    (a copy of the Lookup on every miss cost ~2 us, for no one)."""
    if isinstance(outcome, Lookup) and outcome.token is not None:
        return replace(outcome, token=None)
    return outcome


class Cache(Values):
    """The response cache's backend, counters and invalidation API, and the
    data cache: ``get``/``set``/``delete``/``incr`` (``_values``) and
    :meth:`memoize` (``_memo``).

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
        serializer: how ``get``/``set`` and memoized results turn values into bytes
            and back (a ``dumps``/``loads`` object); default :class:`JsonSerializer`
            (orjson). Never pickle.
        near_cache: keep entries, vary records and versions in process memory too
            (``asgi_redis_kit.near``, kept correct by Redis CLIENT TRACKING), so a
            hit, a 304 or a HEAD of a hot page sends no Redis command. ``True``
            uses ``NearCache.shared()``; pass a ``NearCache`` to bound it
            yourself (it is yours to close); ``False`` (the default): off. An
            in-process ``memory://`` server has no tracking: the cache then runs
            without it (logged once), and so does a Cluster client that reads
            from replicas (``read_from_replicas``, ``load_balancing_strategy``):
            a lagging replica can answer with a value older than an
            invalidation already received. See ``_near_layer``.

    ``stats`` holds the counters (:class:`CacheStats`); with a near cache,
    ``stats.near_hits`` counts lookups answered from memory, ``stats.near_misses``
    those that went to Redis, and ``stats.near`` (``as_dict()["near"]``) is the
    NearCache's own counters (shared by all its users). ``near_cache`` is the
    NearCache in use, or None.
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
        near_cache: bool | NearCache = False,
        serializer: Serializer | None = None,
    ) -> None:
        wanted = near_option(near_cache)
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
        self.serializer: Serializer = serializer or JsonSerializer()
        # Memoized refills in progress, by entry key (``_memo``).
        self.value_flights: dict[str, asyncio.Future[Any]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._lookups: dict[tuple[str, bool, tuple[str, ...]], _SharedLookup] = {}
        self.redis_layer = RedisLayer(
            redis,
            timeout=timeout,
            max_connections=max_connections,
            breaker=self.breaker,
            stats=self.stats,
            lock_lease=lock_lease,
            max_lifetime=max_lifetime,
            clock=clock,
            spawn=self.spawn,
        )
        self.backend = self.redis_layer.backend
        # Where every lookup, lease and store goes: the chain of storage layers.
        self.storage: Storage = self.redis_layer
        self.near_cache = near = near_for(wanted, self.backend.client, logger)
        if near is not None:
            self.stats.near = near.stats
            self.storage = NearLayer(self.redis_layer, near, prefix=key_prefix, stats=self.stats)

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

    # -- lookups, shared by concurrent requests -----------------------------------------

    async def lookup(
        self,
        key: CacheKey,
        *,
        lease: bool = False,
        session: SessionProof | None = None,
        follow: bool = True,
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
        themselves, and a lease its script may have taken is released.

        ``follow=False``: return what ``key`` found even when the record names
        other headers (tags, for a value: a memoized call stores under its own)."""
        found = await self._shared_lookup(key, lease, session)
        if found.record == key.learned or found.session_gone or not follow:
            return found
        # Each request derives the variant from its own header values.
        return await self._shared_lookup(self.keys.learn(key, found.record), lease, session)

    async def _shared_lookup(
        self, key: CacheKey, lease: bool, session: SessionProof | None
    ) -> Lookup:
        # A value's entry name is shared by lookups of other tags (a set() of
        # the key and a memoized call): the versions read differ with them.
        name = (key.entry, lease, key.learned)
        flight = self._lookups.get(name)
        if flight is not None:
            # A per-user entry's key names its session, so joiners share the proof.
            return await self._join(key, lease, flight, session)
        flight = self._lookups[name] = _SharedLookup()
        outcome: Lookup | BackendUnavailable | None = None
        try:
            outcome = await self.storage.lookup(key, lease=lease, session=session)
            return outcome
        except BackendUnavailable as exc:
            outcome = exc
            raise
        finally:
            del self._lookups[name]
            if flight.outcome is not None:
                flight.outcome.set_result(_for_joiners(outcome))

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

    async def poll(self, key: CacheKey, versions: tuple[int, ...]) -> Lookup:
        """The entry, and (``locked``) whether someone still holds its lease."""
        return await self.storage.poll(key, versions)

    async def acquire(
        self, key: CacheKey, versions: tuple[int, ...]
    ) -> tuple[str | None, Entry | None]:
        """Take the lease: (token, None), or (None, a fresh entry stored meanwhile by
        another leader), or (None, None) if someone else holds it."""
        token, entry = await self.storage.acquire(key, versions)
        if token is None or entry is None:
            return token, None
        outcome = classify(Lookup(key, entry, versions), self.clock())
        if isinstance(outcome, Fresh):
            # A leader stored it just before we took the lease: serve it instead.
            await self.storage.release(key, token)
            return None, outcome.entry
        return token, None

    async def release(self, key: CacheKey, token: str) -> None:
        await self.storage.release(key, token)

    async def release_quietly(self, key: CacheKey, token: str) -> None:
        """:meth:`release`, for a background task: a Redis failure lets the lease expire."""
        with contextlib.suppress(BackendUnavailable):
            await self.storage.release(key, token)

    async def wait_for_lease(
        self, key: CacheKey, versions: tuple[int, ...]
    ) -> tuple[Entry | None, bool]:
        """Poll ``key``'s entry while another process holds its lease: the fresh
        entry, and whether the lease was released without one (False: ``lock_wait``
        ran out). Backs off from 5 ms to 100 ms between polls."""
        delay = 0.005
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_wait
        while loop.time() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 1.5, 0.1)
            found = await self.poll(key, versions)
            outcome = classify(found, self.clock())
            if isinstance(outcome, Fresh):
                return outcome.entry, False
            if not found.locked:
                return None, True
        return None, False

    async def store(
        self, key: CacheKey, entry: Entry, token: str | None, *, vary: Sequence[str] = ()
    ) -> None:
        """Store ``entry`` for ``key`` and release its lease ``token``.

        ``vary``: the request headers the response varies on that ``key`` does
        not hold yet (learned from its ``Vary``). The entry then goes under the
        variant keyed on them as well, and the URL's vary record names them all,
        in the same round trip."""
        target = key
        if not set(vary) <= set(key.learned):
            target = self.keys.learn(key, sorted({*key.learned, *vary}))
        await self.storage.store(target, key, entry, token)
        self.stats.stores += 1

    # -- the data cache: memoized functions ------------------------------------------

    def memoize(
        self,
        *,
        ttl: float,
        key: str | Callable[..., str] | None = None,
        tags: Iterable[str] = (),
        stale_while_revalidate: float = 0,
        stale_if_error: float = 0,
        lock: bool = True,
        serializer: Serializer | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Memoized[P, R]]:
        """Cache an ``async def`` function's results for ``ttl`` seconds::

            @cache.memoize(ttl=300, tags=["user:{user_id}"])
            async def load_profile(user_id: int) -> dict[str, Any]: ...

        Parameters:
            ttl: seconds a result is fresh.
            key: the data key of a call, as a template over the arguments
                (``"profile:{user_id}"``) or a function of them; default: the
                function's module and qualified name and a hash of its bound
                arguments (defaults applied; a method's ``self``/``cls`` left out). An
                argument the default cannot encode canonically is a TypeError
                that asks for ``key=``.
            tags: templates over the arguments (``"user:{user_id}"``);
                ``invalidate_tags("user:42")`` drops the results stored with it,
                and the cached pages with that tag.
            stale_while_revalidate: seconds after ``ttl`` in which a stale result
                is returned while one background call refreshes it.
            stale_if_error: seconds after ``ttl`` in which a stale result is
                returned if the function raises.
            lock: hold a Redis lease while the function runs, so concurrent calls
                in other processes wait for its result (in this process they
                always do).
            serializer: instead of the cache's (``PydanticSerializer(Model)`` for
                functions that return pydantic models).

        See ``_memo`` for the flow and :class:`Memoized` for ``.key()`` and
        ``.invalidate()``."""

        # Checked now, not when the decorator is applied.
        options = check_options(ttl, tags, stale_while_revalidate, stale_if_error)

        def decorate(func: Callable[P, Awaitable[R]]) -> Memoized[P, R]:
            return Memoized(self, func, options=options, key=key, lock=lock, serializer=serializer)

        return decorate

    # -- invalidation ----------------------------------------------------------------------

    async def invalidate_tags(self, *tags: str) -> int:
        """Invalidate every entry stored with any of ``tags`` (filled templates, e.g.
        ``"item:42"``), in every namespace. O(1) per tag: one version bump, no SCAN.
        Returns the number of tags bumped (version counters, not entries)."""
        if check_tags(tags):
            await self.storage.bump([self.keys.tag_version(tag) for tag in tags])
            self.stats.invalidations["tag"] += len(tags)
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
        await self.storage.bump([self.keys.url_version(url_id)])
        self.stats.invalidations["url"] += 1
        return 1

    async def clear(self, namespace: str | None = None) -> int:
        """Drop every entry of ``namespace`` (default: the cache's) in O(1) by bumping
        its generation; old entries expire on their own. Returns the new generation."""
        generation = await self.storage.bump_generation(
            self.keys.generation(namespace or self.namespace)
        )
        self.stats.invalidations["namespace"] += 1
        return generation

    # -- lifecycle ----------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
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
        # What the cancelled ones spawned on their way out (a lease to give back,
        # bounded by the Redis deadline) still runs before the client closes.
        await self.wait_background()
        await self.storage.aclose()
