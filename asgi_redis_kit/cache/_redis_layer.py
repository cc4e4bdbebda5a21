"""The Redis layer: every Redis command the cache sends, and every difference
between a single Redis server and Redis Cluster, in this one module.

* a lookup reads the entry, its URL's vary record and the current versions in
  one round trip: the ``LOOKUP`` script on a single server (which also takes
  the stampede lease when the entry key is absent, and proves a per-user
  entry's session still exists), one pipelined GET per key on Cluster (which
  stays correct while slots migrate; the lease then takes a round trip of its
  own, ``acquire``);
* ``acquire``, ``release`` and ``store`` take, give back and store under the
  lease (``_scripts`` on a single server, single-key commands in one
  pipeline on Cluster);
* ``bump`` and ``bump_generation`` are invalidation's version bumps (``BUMP``);
* ``shares_server`` tells whether a session store is this very server.

Every call goes through the circuit breaker (``_breaker``): a Redis that
fails opens it, and the cache then bypasses Redis instead of waiting on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from types import TracebackType
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import MaxConnectionsError, NoScriptError

from .._redis import Backend, RedisClient, RedisLike
from ..errors import BackendUnavailable
from ._breaker import CircuitBreaker
from ._entry import Entry, decode, encode
from ._keys import CacheKey, record_names
from ._lock import new_token
from ._scripts import (
    ACQUIRE,
    BUMP,
    DELETE_VALUE,
    INCR_VALUE,
    LOOKUP,
    RELEASE,
    SET_VALUE,
    STORE_AND_RELEASE,
)
from ._stats import CacheStats
from ._storage import Lookup, ReadBack, SessionProof

# Seconds before its expected expiry at which an entry counts as maybe gone (clock
# skew between workers, rounding of PX).
_EXPIRY_MARGIN = 1.0
_PRESENT_MEMO = 4096


class _Guarded:
    """What ``RedisLayer._redis()`` returns. A class, not ``@asynccontextmanager``: it
    wraps every Redis call of every request, hits included."""

    __slots__ = ("_cache", "_call", "_op")
    _call: AbstractAsyncContextManager[RedisClient]

    def __init__(self, cache: RedisLayer, op: str) -> None:
        self._cache = cache
        self._op = op

    async def __aenter__(self) -> RedisClient:
        if not self._cache.breaker.allow():
            raise BackendUnavailable("the cache's circuit breaker is open")
        self._call = self._cache.backend.call(self._op)
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
    try:
        return tuple(int(value) if value is not None else 0 for value in raw)
    except ValueError as exc:
        # Not a version we wrote (someone else's SET on our key): no entry can
        # be trusted or stored against it, so the request bypasses the cache
        # as when Redis fails (the breaker is not told: Redis is fine).
        raise BackendUnavailable("a cache version key holds a value that is not a version") from exc


def _same_server(a: RedisClient, b: RedisClient) -> bool:
    """Whether two clients surely talk to one Redis server and database (then a
    session key can be checked in the cache's own round trip)."""
    if a is b:
        return True
    if isinstance(a, RedisCluster) or isinstance(b, RedisCluster):
        return False
    pool_a, pool_b = a.connection_pool, b.connection_pool
    if isinstance(pool_a, SentinelConnectionPool) or isinstance(pool_b, SentinelConnectionPool):
        return False
    if pool_a.connection_class is not pool_b.connection_class:
        return False
    kwargs_a, kwargs_b = pool_a.connection_kwargs, pool_b.connection_kwargs
    if not (kwargs_a.get("host") or kwargs_a.get("path")):
        return False
    # "server": fakeredis keeps its in-process server among the connection options.
    names = ("host", "port", "path", "db", "username", "server")
    return all(
        kwargs_a.get(name) is kwargs_b.get(name) or kwargs_a.get(name) == kwargs_b.get(name)
        for name in names
    )


class RedisLayer:
    """The cache's storage in Redis (a single server, Sentinel or Cluster):
    implements :class:`~._storage.Storage`."""

    def __init__(
        self,
        redis: RedisLike,
        *,
        timeout: float,
        max_connections: int,
        breaker: CircuitBreaker,
        stats: CacheStats,
        lock_lease: float,
        max_lifetime: float,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.backend = Backend(redis, timeout=timeout, max_connections=max_connections)
        self.breaker = breaker
        self.stats = stats
        self.lock_lease = lock_lease
        self.max_lifetime = max_lifetime
        self.clock = clock
        # Background work of the Cache (a lease to give back after a cancel).
        self._spawn = spawn
        client = self.backend.client
        # Known once (the Backend's clients are all alike): an isinstance() of
        # redis-py's Protocol-based client classes is slow, and every call asked.
        self._cluster = self.backend.cluster
        # On Cluster the version keys live in other slots than the entry: no script
        # can read them with it, so a miss takes its lease in a round trip of its own.
        self._lease_in_lookup = not self._cluster
        # Entry keys seen lately, and when Redis drops them (our clock). A key
        # expected to be there is looked up with a plain MGET: Redis runs a script
        # ~10x slower than MGET, and a hit has no lease to take. Only a hint: a
        # key that is gone after all is a miss that takes its lease separately.
        self._present: dict[str, float] = {}
        self._lookup_script = client.register_script(LOOKUP)
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._store = client.register_script(STORE_AND_RELEASE)
        self._set_value = client.register_script(SET_VALUE)
        self._incr_value = client.register_script(INCR_VALUE)
        self._delete_value = client.register_script(DELETE_VALUE)

    async def aclose(self) -> None:
        await self.backend.aclose()

    def shares_server(self, other: Backend) -> bool:
        """Whether ``other`` surely talks to this Redis server and database: then a
        session key there is checked in the lookup's own round trip."""
        return _same_server(other.client, self.backend.client)

    # -- Redis access, guarded by the breaker -------------------------------------------

    def _redis(self, op: str) -> _Guarded:
        """``async with self._redis(op) as client``: one Redis call, bounded by the
        backend's deadline, failures translated and fed to the breaker; ``op``
        names it in the backend's counters (the latency histogram's label)."""
        return _Guarded(self, op)

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
        self, client: RedisClient, keys: list[str], *, exists_last: bool = False, ttls: bool = False
    ) -> list[Any]:
        """GET of every key (``exists_last``: EXISTS of the last one), one round trip;
        ``ttls`` (Cluster only): then the PTTL of each GET's key, appended."""
        if self._cluster:
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
            if ttls:
                for name in keys[:-1] if exists_last else keys:
                    pipe.pttl(name)
            return list(await pipe.execute())
        if exists_last:
            # Not reached today (a single server proves sessions in the LOOKUP script).
            batch = client.pipeline(transaction=False)
            batch.mget(keys[:-1])
            batch.exists(keys[-1])
            values, exists = await batch.execute()
            return [*values, exists]
        # The MGET client.mget() sends, without its argument handling (a hit's
        # only command): the reply is a new list already.
        reply: list[Any] = await client.execute_command("MGET", *keys)
        return reply

    def _valid(self, raw: bytes | None, versions: tuple[int, ...]) -> Entry | None:
        if raw is None:
            return None
        entry = decode(raw)
        if entry is None or entry.versions != versions:
            return None  # written under an older namespace/URL/tag version
        return entry

    # -- the storage interface ---------------------------------------------------------

    async def lookup(self, key: CacheKey, *, lease: bool, session: SessionProof | None) -> Lookup:
        """One round trip; ``lease``: take the lease with it if the entry is absent
        (on a single server, and unless the entry is expected to be there). If
        the caller is cancelled meanwhile, a lease the script may have taken is
        given back."""
        found, _ = await self.lookup_reading(key, lease=lease, session=session, ttls=False)
        return found

    async def lookup_reading(
        self, key: CacheKey, *, lease: bool, session: SessionProof | None, ttls: bool
    ) -> tuple[Lookup, ReadBack | None]:
        """:meth:`lookup`, and (``ttls``) what it read key by key with each
        key's PTTL, read in the same round trip, for a near layer to keep."""
        token = new_token() if lease and self._may_be_absent(key) else ""
        try:
            return await self._lookup(key, token, session, ttls)
        except asyncio.CancelledError:
            if token:
                self._spawn(self._release_quietly(key, token))
            raise

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

    async def _release_quietly(self, key: CacheKey, token: str) -> None:
        with contextlib.suppress(BackendUnavailable):
            await self.release(key, token)

    async def _lookup(
        self, key: CacheKey, token: str, session: SessionProof | None, ttls: bool
    ) -> tuple[Lookup, ReadBack | None]:
        """One round trip; ``token``: take the lease with it if the entry is absent;
        ``ttls``: read each key's PTTL with it."""
        if session is not None and session.backend is not None:
            # The session lives on another server: ask it at the same time.
            (found, read), alive = await asyncio.gather(
                self._lookup(key, token, None, ttls),
                _session_exists(session.key, session.backend),
            )
            if alive:
                return found, read
            return replace(found, entry=None, session_gone=True), read
        alive = True
        pttls: list[Any] = []
        async with self._redis("cache_lookup") as client:
            # On one server the lookup script also proves the session still exists.
            single = not self._cluster
            session_keys = [session.key] if session is not None and single else []
            if single and (token or session_keys or ttls):
                # One atomic step: the entry, its vary record and versions, and the
                # lease if the entry key is absent (a cold miss then needs no round
                # trip of its own for it), and their PTTLs when asked for.
                raw = await _evalsha(
                    self._lookup_script,
                    client,
                    [key.entry, key.lock, key.vary_record, *session_keys, *key.version_keys],
                    [
                        token,
                        int(self.lock_lease * 1000),
                        len(session_keys),
                        key.record_value,
                        1 if ttls else 0,
                    ],
                )
                if ttls:
                    count = 2 + len(key.version_keys)
                    pttls, raw = raw[-count:], raw[:-count]
                alive = int(raw.pop()) == 1
                leased = int(raw.pop())
            else:
                names = [key.entry, key.vary_record, *key.version_keys]
                if session is not None:
                    # Cluster: the session key is in another slot; one more command
                    # in the same pipeline (see _mget).
                    raw = await self._mget(
                        client, [*names, session.key], exists_last=True, ttls=ttls
                    )
                    if ttls:
                        pttls, raw = raw[-len(names) :], raw[: -len(names)]
                    alive = int(raw.pop()) == 1
                else:
                    raw = await self._mget(client, names, ttls=ttls)
                    if ttls:
                        pttls, raw = raw[len(names) :], raw[: len(names)]
                leased = 0
        versions = _versions(raw[2:])
        record = record_names(raw[1])
        decoded = None if raw[0] is None else decode(raw[0])
        read = ReadBack(raw, [int(t) for t in pttls], decoded, alive) if ttls else None
        if not alive:
            return Lookup(key, None, versions, session_gone=True, record=record), read
        entry = decoded if decoded is not None and decoded.versions == versions else None
        if entry is None:
            self._remember(key, None)
        else:
            self._remember(key, entry.lifetime, entry.stored_at)
        if leased == 1:
            return Lookup(key, entry, versions, token=token, record=record), read
        return Lookup(key, entry, versions, locked=leased == -1, record=record), read

    async def poll(self, key: CacheKey, versions: tuple[int, ...]) -> Lookup:
        """The entry, and (``locked``) whether someone still holds its lease."""
        async with self._redis("cache_poll") as client:
            raw = await self._mget(client, [key.entry, key.lock])
        return Lookup(key, self._valid(raw[0], versions), versions, locked=raw[1] is not None)

    async def acquire(
        self, key: CacheKey, versions: tuple[int, ...]
    ) -> tuple[str | None, Entry | None]:
        """Take the lease: (token, the valid entry there at that moment, if any),
        or (None, None) if someone else holds it."""
        token = new_token()
        try:
            return await self._acquire_with(token, key, versions)
        except (asyncio.CancelledError, BackendUnavailable) as exc:
            # Cancelled, or the reply lost after it was sent (not the breaker, which
            # sends nothing): the SET may have taken the lease. Give it back, or the
            # other processes wait for it until lock_lease.
            if isinstance(exc, asyncio.CancelledError) or exc.__cause__ is not None:
                self._spawn(self._release_quietly(key, token))
            raise

    async def _acquire_with(
        self, token: str, key: CacheKey, versions: tuple[int, ...]
    ) -> tuple[str | None, Entry | None]:
        lease_ms = int(self.lock_lease * 1000)
        async with self._redis("cache_acquire") as client:
            if self._cluster:
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
        return token, self._valid(raw, versions)

    async def release(self, key: CacheKey, token: str) -> None:
        async with self._redis("cache_release") as client:
            await self._release(keys=[key.lock], args=[token], client=client)

    async def store(
        self, target: CacheKey, leased: CacheKey, entry: Entry, token: str | None
    ) -> None:
        """Store ``entry`` under ``target`` (its vary record too, when it learned
        names) and release ``leased``'s lease ``token``, in one round trip."""
        value = encode(entry)
        lifetime = entry.lifetime
        px = max(1, int(min(lifetime, self.max_lifetime) * 1000))
        async with self._redis("cache_store") as client:
            if target.value_of:
                # A data entry's keys share one slot (Cluster too): the script stores
                # it only if no set()/delete() bumped the value's version since the
                # refill read it (its versions' second, see CacheKey.version_keys).
                await self._run(
                    self._store,
                    client,
                    [target.entry, leased.lock, target.vary_record, target.url_version],
                    [value, px, token or "", target.record_value, 1, entry.versions[1]],
                )
            elif self._cluster:
                # Single-key commands, one pipeline (see _mget): the SETs, then the
                # token-checked release.
                pipe = client.pipeline()
                pipe.set(target.entry, value, px=px)
                if target.learned:
                    pipe.set(target.vary_record, target.record_value, px=px)
                if token:
                    pipe.eval(RELEASE, 1, leased.lock, token)
                await pipe.execute()
            else:
                await _evalsha(
                    self._store,
                    client,
                    [target.entry, leased.lock, target.vary_record],
                    [value, px, token or "", target.record_value, 0],
                )
        self._remember(target, lifetime, self.clock())

    async def _run(
        self, script: AsyncScript, client: RedisClient, keys: list[Any], args: list[Any]
    ) -> Any:
        """:func:`_evalsha` on a single server; on Cluster, redis-py's own script
        call, which loads a missing script on the node that owns the keys."""
        if self._cluster:
            return await script(keys=keys, args=args, client=client)
        return await _evalsha(script, client, keys, args)

    @property
    def _version_px(self) -> int:
        # Versions outlive every entry written under them, so an expired version
        # key can never bring back an entry stored before the bump.
        return int((self.max_lifetime + 60) * 1000)

    async def set_value(self, key: CacheKey, head: bytes, body: bytes, lifetime: float) -> None:
        """Write a data entry under the current versions, bumping the value's
        own (``_scripts.SET_VALUE``): one round trip on a single server; on
        Cluster, the other versions are read first."""
        px = max(1, int(min(lifetime, self.max_lifetime) * 1000))
        args: list[Any] = [head, body, px, key.record_value, self._version_px]
        await self._value_script(self._set_value, key, args)
        self._remember(key, lifetime, self.clock())

    async def incr_value(self, key: CacheKey, head: bytes, amount: int, lifetime: float) -> int:
        """Add ``amount`` to the counter at ``key`` (``_scripts.INCR_VALUE``)."""
        px = max(1, int(min(lifetime, self.max_lifetime) * 1000))
        args = [head, amount, px, self._version_px]
        status, text = await self._value_script(self._incr_value, key, args)
        if int(status) == 0:
            raise TypeError("the cached value is not a counter made by incr(); delete() it first")
        if int(status) == 2:
            raise ValueError("the counter would pass 2**53, past which Redis's Lua is not exact")
        return int(text)

    async def delete_value(self, key: CacheKey) -> bool:
        """Bump the value's version and drop its entry and record; whether it was there."""
        async with self._redis("cache_delete_value") as client:
            gone = await self._run(
                self._delete_value,
                client,
                [key.entry, key.url_version, key.vary_record],
                [self._version_px],
            )
        self._remember(key, None)
        return bool(gone)

    async def _value_script(self, script: AsyncScript, key: CacheKey, args: list[Any]) -> Any:
        own = [key.entry, key.url_version, key.vary_record]
        others = [key.generation, *key.tag_versions]
        async with self._redis("cache_value_write") as client:
            if not self._cluster:
                return await _evalsha(script, client, [*own, *others], args)
            # The generation and tag versions live in other slots: read them first
            # (one GET each, pipelined, see _mget); the script then runs in the
            # value's slot. An invalidation between the two is as if it came before.
            versions = _versions(await self._mget(client, others))
        async with self._redis("cache_value_write") as client:
            return await self._run(script, client, own, [*args, *versions])

    async def bump(self, names: list[str]) -> None:
        px = self._version_px
        async with self._redis("cache_bump") as client:
            pipe = client.pipeline(transaction=not self._cluster)
            for name in names:
                # EVAL, not EVALSHA: an invalidation is rare, and a pipeline
                # could not load a script a node lost (NOSCRIPT) and retry.
                pipe.eval(BUMP, 1, name, px)
            await pipe.execute()

    async def bump_generation(self, name: str) -> int:
        async with self._redis("cache_bump") as client:
            generation = await client.eval(BUMP, 1, name, 0)  # see bump(): EVAL
        return int(generation)


async def _evalsha(
    script: AsyncScript, client: RedisClient, keys: list[Any], args: list[Any]
) -> Any:
    """``script(keys=keys, args=args, client=client)`` without redis-py's per-call
    import and pipeline check (about a tenth of a script call's CPU, twice per
    miss): the same EVALSHA, and on NOSCRIPT the same load and one retry."""
    try:
        return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        script.sha = await client.execute_command("SCRIPT LOAD", script.script)
        return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
