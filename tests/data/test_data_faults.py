"""The data cache when Redis misbehaves (fail open, breaker, single-flight
without Redis) and with the near cache (no round trip on a repeated hit,
coherent across instances)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache, NearCache
from tests.support import RedisProcess, RedisSpy, counting_client

pytestmark = pytest.mark.real_redis


@pytest.mark.parametrize("fault", ["stopped", "paused"])
async def test_redis_down_runs_the_function_once_per_key_and_the_breaker_opens(
    own_redis: RedisProcess, fault: str
) -> None:
    spy = RedisSpy()
    client = counting_client(own_redis.url, spy, socket_timeout=5)
    cache = Cache(client, key_prefix="f:", timeout=0.2, breaker_threshold=2, breaker_cooldown=60)
    calls = 0
    go = asyncio.Event()

    @cache.memoize(ttl=60)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        await go.wait()
        return x + 1

    try:
        assert await cache.get("warm") is None
        if fault == "stopped":
            own_redis.stop()
        else:
            own_redis.pause()
        tasks = [asyncio.create_task(f(1)) for _ in range(20)]
        await asyncio.sleep(0.5)  # every lookup failed (deadline 0.2 s); one call runs f
        go.set()
        assert await asyncio.gather(*tasks) == [2] * 20
        assert calls == 1
        # The burst shared one lookup: one failure. Two more open the breaker;
        # after that no call waits on Redis.
        for i in range(10):
            assert await f(100 + i) == 101 + i
            assert await cache.get("k", "default") == "default"
        assert cache.breaker.state == "open"
        assert cache.stats.errors == 2
    finally:
        if fault == "paused":
            own_redis.resume()
        await cache.aclose()
        await client.aclose()


async def test_caching_resumes_when_redis_returns(own_redis: RedisProcess) -> None:
    now = [1000.0]

    def clock() -> float:
        return now[0]

    async with Cache(
        own_redis.url, timeout=0.2, breaker_threshold=1, breaker_cooldown=5, clock=clock
    ) as cache:
        calls = 0

        @cache.memoize(ttl=600)
        async def f() -> int:
            nonlocal calls
            calls += 1
            return calls

        own_redis.stop()
        assert await f() == 1
        opened = cache.breaker.state
        assert opened == "open"
        own_redis.start()
        now[0] += 6  # the cool-down is over: the next call probes
        assert await f() == 2
        assert await f() == 2
        assert cache.breaker.state == "closed"


async def until(condition: Callable[[], object], within: float = 10.0) -> None:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within, f"not true within {within} s"
        await asyncio.sleep(0.02)


@pytest.fixture
async def near() -> AsyncIterator[NearCache]:
    made = NearCache(heartbeat=0.2, heartbeat_timeout=0.3)
    try:
        yield made
    finally:
        await made.aclose()


async def test_a_repeated_hit_sends_nothing_with_the_near_cache(
    near: NearCache, redis_url: str, key_prefix: str
) -> None:
    spy = RedisSpy()
    client = counting_client(redis_url, spy)
    try:
        async with Cache(client, key_prefix=key_prefix, near_cache=near) as cache:
            calls = 0

            @cache.memoize(ttl=60, tags=["t:{x}"])
            async def f(x: int) -> int:
                nonlocal calls
                calls += 1
                return x

            await cache.set("k", {"v": 1}, ttl=60, tags=["a"])
            await until(lambda: near.view(client, key_prefix).usable)
            assert await f(3) == 3
            # Read and kept once our own writes' invalidations are back (a read
            # they overtake is not kept).
            for _ in range(100):
                spy.reset()
                assert await cache.get("k") == {"v": 1}
                assert await f(3) == 3
                if spy.total == 0:
                    break
                await asyncio.sleep(0.02)
            spy.reset()
            for _ in range(20):
                assert await cache.get("k") == {"v": 1}
                assert await f(3) == 3
            assert spy.total == 0, spy.commands
            assert calls == 1
            assert cache.stats.near_hits >= 40
    finally:
        await client.aclose()


@pytest.mark.parametrize("change", ["set", "delete", "tag", "clear", "incr", "redis-cli"])
async def test_a_change_on_another_instance_is_seen_with_the_near_cache(
    near: NearCache, redis_url: str, key_prefix: str, change: str
) -> None:
    other_near = NearCache(heartbeat=0.2, heartbeat_timeout=0.3)
    async with (
        Cache(redis_url, key_prefix=key_prefix, near_cache=near) as a,
        Cache(redis_url, key_prefix=key_prefix, near_cache=other_near) as b,
        Redis.from_url(redis_url) as raw,
    ):
        try:
            await a.set("k", 1 if change == "incr" else "old", ttl=60, tags=["t"])
            if change == "incr":
                await a.delete("k")
                await a.incr("k")
            await until(lambda: near.view(a.backend.client, key_prefix).usable)
            expected_old = 1 if change == "incr" else "old"
            assert await a.get("k") == expected_old
            assert await a.get("k") == expected_old  # from memory now
            hits = a.stats.near_hits
            assert hits >= 1
            if change == "set":
                await b.set("k", "new", ttl=60)
                wanted: object = "new"
            elif change == "delete":
                await b.delete("k")
                wanted = None
            elif change == "tag":
                await b.invalidate_tags("t")
                wanted = None
            elif change == "clear":
                await b.clear()
                wanted = None
            elif change == "incr":
                await b.incr("k", 4)
                wanted = 5
            else:
                await raw.delete(a.value_key("k").entry)
                wanted = None
            seen: list[object] = []

            async def changed() -> bool:
                seen.append(await a.get("k"))
                return seen[-1] == wanted

            start = time.monotonic()
            while not await changed():
                assert time.monotonic() - start < 5, seen[-5:]
                await asyncio.sleep(0.01)
        finally:
            await other_near.aclose()
