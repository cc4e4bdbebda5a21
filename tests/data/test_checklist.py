"""The reliability checklist (/work/shared/CHECKLIST.md) on the data cache's API
(get, get_many, exists, set, delete, incr, @cache.memoize), on a real Redis:

* 29: a value is never returned after its TTL (with and without the near
  cache), a memoized value stale only inside its windows;
* 33: Redis paused (SIGSTOP): reads fail open, writes raise BackendUnavailable,
  nothing hangs, and once resumed every key reads its own value again;
* 35: ten times ``max_connections`` callers behind a slow Redis degrade
  (default / the function runs), no raw redis exception escapes, no deadlock.

Times are only compared with the TTLs themselves: a read *started* after the
moment its value must be gone may not return it. Everything else that is timed
is a did-not-hang bound (``asyncio.timeout``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis

from asgi_redis_kit import BackendUnavailable, Cache, NearCache
from tests.near.cache_app import near_ready
from tests.near.conftest import HEARTBEAT, HEARTBEAT_TIMEOUT, until
from tests.support import DelayProxy, RedisProcess

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]

HANG = 20.0  # did-not-hang bound of a whole phase, in seconds

MakeCache = Callable[..., Awaitable[Cache]]


@pytest.fixture(params=["redis-only", "near"])
async def make_cache(
    request: pytest.FixtureRequest, redis_url: str, key_prefix: str
) -> AsyncIterator[MakeCache]:
    """Caches on the shared Redis, with a near cache in the ``near`` variant
    (ready before the test starts)."""
    made: list[Cache] = []
    nears: list[NearCache] = []

    async def make(**options: Any) -> Cache:
        near: NearCache | bool = False
        if request.param == "near":
            near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
            nears.append(near)
        cache = Cache(redis_url, key_prefix=key_prefix, timeout=5, near_cache=near, **options)
        made.append(cache)
        if near:
            await near_ready(cache)
        return cache

    try:
        yield make
    finally:
        for cache in made:
            await cache.aclose()
        for near in nears:
            await near.aclose()


# -- 29: never after the TTL ----------------------------------------------------------


async def watch_expiry(
    read: Callable[[], Awaitable[object]], old: object, gone_after: float, *, until: float
) -> tuple[int, list[tuple[float, object]]]:
    """Read until ``until`` (wall clock): how often ``old`` was read, and the reads
    started after ``gone_after`` that still returned it (and when, past it)."""
    seen = 0
    late: list[tuple[float, object]] = []
    while (started := time.time()) < until:
        value = await read()
        if value == old:
            seen += 1
            if started > gone_after:
                late.append((started - gone_after, value))
        await asyncio.sleep(0.01)
    return seen, late


async def test_a_value_is_never_returned_after_its_ttl(make_cache: MakeCache) -> None:
    cache = await make_cache()
    ttl = 1.0
    await cache.set("k", "old", ttl=ttl)
    written = time.time()  # the entry's clock and Redis's PX both start before this

    async def read() -> object:
        one = await cache.get("k", "default")
        (many,) = await cache.get_many(["k"], "default")
        there = await cache.exists("k")
        # All three must agree on a value past its TTL; any of them is a late read.
        return "old" if "old" in (one, many) or there else one

    seen, late = await watch_expiry(read, "old", written + ttl, until=written + ttl + 0.5)
    assert seen > 0  # it was served while fresh (with the near cache: from memory too)
    assert late == []
    assert cache.stats.near_hits > 0 or cache.near_cache is None


async def test_a_counter_is_never_returned_after_the_ttl_its_first_incr_set(
    make_cache: MakeCache,
) -> None:
    cache = await make_cache()
    ttl = 1.0
    assert await cache.incr("n", ttl=ttl) == 1
    created = time.time()
    late: list[object] = []
    while (started := time.time()) < created + ttl + 0.5:
        if started < created + ttl / 2:
            # Later increments keep the first one's TTL; one that finds the counter
            # gone starts a new one, whose TTL counts from then.
            if await cache.incr("n", ttl=ttl) == 1:
                created = time.time()
        elif (value := await cache.get("n")) is not None and started > created + ttl:
            late.append(value)
        await asyncio.sleep(0.01)
    assert late == []
    assert await cache.get("n") is None


async def test_memoize_serves_stale_only_within_stale_while_revalidate(
    make_cache: MakeCache,
) -> None:
    cache = await make_cache()
    ttl, window = 0.5, 1.5
    calls = 0

    # The background refreshes fail, so the old value is all there is to serve.
    @cache.memoize(ttl=ttl, stale_while_revalidate=window, key="swr")
    async def f() -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("the refresh fails")
        return 1

    assert await f() == 1
    stored = time.time()

    async def read() -> object:
        try:
            called: object = await f()
        except RuntimeError:
            called = "raised"
        fetched = await cache.get("swr")
        return 1 if 1 in (called, fetched) else called

    seen, late = await watch_expiry(read, 1, stored + ttl + window, until=stored + ttl + window + 1)
    await cache.wait_background()
    assert seen > 0
    assert late == []
    assert calls > 1  # stale reads did try to refresh


async def test_memoize_serves_stale_only_within_stale_if_error(make_cache: MakeCache) -> None:
    cache = await make_cache()
    ttl, window = 0.5, 1.5
    calls = 0

    @cache.memoize(ttl=ttl, stale_if_error=window, key="sie")
    async def f() -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("the function fails")
        return 1

    assert await f() == 1
    stored = time.time()
    # get() serves no stale_if_error value at all: only while fresh.
    gets: list[tuple[float, object]] = []

    async def read() -> object:
        started = time.time()
        try:
            called: object = await f()
        except RuntimeError:
            called = "raised"
        gets.append((started, await cache.get("sie")))
        return called

    seen, late = await watch_expiry(read, 1, stored + ttl + window, until=stored + ttl + window + 1)
    assert seen > 0
    assert late == []
    assert calls > 1  # served stale because the function raised, not from a fresh entry
    assert [value for started, value in gets if started > stored + ttl and value == 1] == []


# -- 33: Redis paused -------------------------------------------------------------------


async def client_count(server: RedisProcess) -> int:
    async with Redis.from_url(server.url, socket_timeout=5) as admin:
        return len(await admin.client_list()) - 1  # not admin's own


@pytest.mark.parametrize("client_kind", ["url", "callers-client"])
async def test_paused_redis_fails_reads_open_writes_closed_and_recovers(
    own_redis: RedisProcess, client_kind: str
) -> None:
    timeout, pool = 0.3, 4
    caller: Redis | None = None
    if client_kind == "url":
        redis: str | Redis = own_redis.url
    else:
        # No socket timeout: only the cache's own deadline can end a call.
        redis = caller = Redis(connection_pool=BlockingConnectionPool.from_url(
            own_redis.url, max_connections=pool, timeout=None
        ))  # fmt: skip
    # The breaker never opens: every call below waits on the paused server itself.
    cache = Cache(
        redis, key_prefix="p:", timeout=timeout, max_connections=pool, breaker_threshold=10**9
    )
    calls: dict[int, int] = {}

    @cache.memoize(ttl=60)
    async def f(x: int) -> str:
        calls[x] = calls.get(x, 0) + 1
        return f"f{x}"

    values = {f"k{i}": f"v{i}-{uuid.uuid4().hex}" for i in range(40)}
    try:
        await cache.set_many(values, ttl=60)
        assert await cache.incr("n") == 1
        assert await f(1) == "f1"
        own_redis.pause()
        try:
            async with asyncio.timeout(HANG):
                assert await cache.get("k0", "default") == "default"
                assert await cache.get_many(["k0", "k1"], "d") == ["d", "d"]
                assert not await cache.exists("k0")
                writes: list[Callable[[], Awaitable[object]]] = [
                    lambda: cache.set("k0", "during the pause"),
                    lambda: cache.set_many({"k1": "during the pause"}),
                    lambda: cache.delete("k2"),
                    lambda: cache.incr("n"),
                    lambda: cache.invalidate_tags("t"),
                    lambda: cache.clear(),
                ]
                for write in writes:
                    with pytest.raises(BackendUnavailable):
                        await write()
                assert await f(1) == "f1"  # cached, but unreadable: the function runs
                assert await f(2) == "f2"
                # A burst, more callers than connections: each degrades on its own.
                burst = await asyncio.gather(
                    *(cache.get(key, "default") for key in values),
                    *(f(x) for x in range(10, 20)),
                    return_exceptions=True,
                )
                assert burst == ["default"] * 40 + [f"f{x}" for x in range(10, 20)]
        finally:
            own_redis.resume()
        # Resumed: the commands sent during the pause may still run now (only
        # their replies were given up on), so each write raised above may or
        # may not have happened; but every read gets its own key's value.
        async with asyncio.timeout(HANG):
            expected = dict(values)
            if await cache.get("k0") == "during the pause":
                expected["k0"] = "during the pause"
            if await cache.get("k1") == "during the pause":
                expected["k1"] = "during the pause"
            if await cache.get("k2") is None:
                expected["k2"] = None  # type: ignore[assignment]
            for _ in range(3):
                assert await cache.get_many(list(expected)) == list(expected.values())
            counter = await cache.get("n")
            assert counter in (1, 2)
            assert await cache.incr("n") == counter + 1
            await cache.set("after", "resumed", ttl=60)
            assert await cache.get("after") == "resumed"
            ran = calls.get(3, 0)
            assert await f(3) == "f3"
            assert await f(3) == "f3"
            assert calls[3] == ran + 1  # stored, then served from Redis
        assert await client_count(own_redis) <= pool
    finally:
        own_redis.resume()
        await cache.aclose()
        if caller is not None:
            await caller.aclose()
            await caller.connection_pool.disconnect()  # a pool passed in is not closed


# -- 35: ten times max_connections -------------------------------------------------------

MISS = object()


async def read_back(cache: Cache, values: dict[str, str]) -> None:
    """Every key gives its own value: a miss (the deadline, on a loaded machine)
    is read again, a value of another key is a failure at once."""
    for _ in range(5):
        got = await cache.get_many(list(values), MISS)
        assert [g for g, v in zip(got, values.values(), strict=True) if g not in (v, MISS)] == []
        if MISS not in got:
            return
    raise AssertionError(f"still missing after 5 reads: {got}")


async def test_get_many_and_set_many_fit_a_callers_small_pool(own_redis: RedisProcess) -> None:
    """A caller's client with a non-blocking pool smaller than get_many's fan-out:
    on an idle, healthy Redis every value is stored and read, none refused by the
    cache's own concurrency ("Too many connections")."""
    plain = ConnectionPool.from_url(own_redis.url, max_connections=2)
    cache = Cache(Redis(connection_pool=plain), key_prefix="s:", timeout=5)
    try:
        values = {f"k{i}": f"v{i}" for i in range(20)}
        await cache.set_many(values, ttl=60)
        assert await cache.get_many(list(values), MISS) == list(values.values())
    finally:
        await plain.disconnect()  # a pool passed in is the caller's to close


@pytest.mark.parametrize("pool_kind", ["url", "callers-blocking", "callers-non-blocking"])
async def test_ten_times_max_connections_degrade_with_no_raw_error(
    own_redis: RedisProcess, pool_kind: str
) -> None:
    """Every reply is held back longer than the cache's deadline, so the first
    callers time out and the rest wait for a connection (URL client: up to the
    pool timeout, which is the deadline; a caller's blocking pool: up to our
    deadline; a caller's non-blocking pool refuses at once). All degrade."""
    timeout, pool, callers = 0.3, 4, 40
    async with DelayProxy(own_redis.port) as proxy:
        caller: Redis | None = None
        redis: str | Redis = proxy.url
        if pool_kind == "callers-blocking":
            blocking = BlockingConnectionPool.from_url(proxy.url, max_connections=pool, timeout=60)
            redis = caller = Redis(connection_pool=blocking)
        elif pool_kind == "callers-non-blocking":
            plain = ConnectionPool.from_url(proxy.url, max_connections=pool)
            redis = caller = Redis(connection_pool=plain)
        cache = Cache(
            redis, key_prefix="c:", timeout=timeout, max_connections=pool, breaker_threshold=10**9
        )
        calls = 0

        @cache.memoize(ttl=60)
        async def f(x: int) -> str:
            nonlocal calls
            calls += 1
            return f"f{x}"

        values = {f"k{i}": f"v{i}" for i in range(callers)}
        try:
            for key, value in values.items():
                await cache.set(key, value, ttl=60)
            proxy.latency = 1.0
            async with asyncio.timeout(HANG):
                got = await asyncio.gather(
                    *(cache.get(key, "default") for key in values), return_exceptions=True
                )
                ran = await asyncio.gather(*(f(x) for x in range(callers)), return_exceptions=True)
            # No exception of any kind, and no caller got another key's value.
            assert [g for g in got if g != "default"] == []
            assert ran == [f"f{x}" for x in range(callers)]
            assert calls == callers
            proxy.latency = 0
            async with asyncio.timeout(HANG):
                await read_back(cache, values)
                assert await f(0) == "f0"
                assert await f(0) == "f0"
            assert calls == callers + 1  # stored once Redis answered, then a hit
            # The connections given up on are closed; no more than the pool stay open.
            await until(lambda: proxy.open_connections <= pool)
        finally:
            await cache.aclose()
            if caller is not None:
                await caller.aclose()
                await caller.connection_pool.disconnect()  # a pool passed in is not closed
