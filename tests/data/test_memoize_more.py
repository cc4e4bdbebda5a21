"""@cache.memoize against a real Redis: one run for 100 calls over two
instances, O(1) invalidation by tag and namespace, failing open."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from asgi_redis_kit.cache import Cache
from asgi_redis_kit.errors import BackendUnavailable
from tests.support import RedisProcess, RedisSpy


async def test_stampede_over_two_instances_runs_once(redis_url: str, key_prefix: str) -> None:
    caches = [Cache(redis_url, key_prefix=key_prefix, timeout=5) for _ in range(2)]
    gate = asyncio.Event()
    calls = 0

    async def slow(x: int) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return x + 1

    memos = [cache.memoize(ttl=60)(slow) for cache in caches]
    try:
        tasks = [asyncio.create_task(memos[n % 2](7)) for n in range(100)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while calls == 0:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # let every other caller reach its wait
        gate.set()
        assert set(await asyncio.gather(*tasks)) == {8}
        assert calls == 1
    finally:
        for cache in caches:
            await cache.aclose()


async def test_tag_invalidation_is_constant_work(
    real_redis: Redis, key_prefix: str, spy: RedisSpy
) -> None:
    """Commands per invalidation do not grow with the entries under the tag."""
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = 0

    @cache.memoize(ttl=60, tags=["user:{user_id}"])
    async def profile(user_id: int, n: int) -> int:
        nonlocal calls
        calls += 1
        return n

    await profile(1, 0)
    for n in range(30):
        await profile(42, n)
    costs = []
    for tag in ("user:1", "user:42"):
        spy.reset()
        await cache.invalidate_tags(tag)
        costs.append(spy.total)
        assert not {"KEYS", "SCAN"} & set(spy.commands)
    assert costs[0] == costs[1]
    await profile(42, 0)
    await profile(1, 0)
    assert calls == 31 + 2


async def test_clear_and_delete_drop_values(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    await cache.set("a", 1, ttl=60)
    await cache.set("b", 2, ttl=60)
    assert await cache.delete("a")
    assert await cache.get("a") is None
    await cache.clear()
    assert await cache.get("b") is None


async def test_redis_down_fails_open_and_writes_raise(own_redis: RedisProcess) -> None:
    cache = Cache(own_redis.url, key_prefix="down:", timeout=0.3, breaker_threshold=2)
    calls = 0

    @cache.memoize(ttl=60)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    try:
        own_redis.stop()
        assert await f(1) == 1
        assert await f(1) == 1
        assert await cache.get("k", default="d") == "d"
        assert cache.breaker.state == "open"
        with pytest.raises(BackendUnavailable):
            await cache.set("k", 1, ttl=60)
        with pytest.raises(BackendUnavailable):
            await cache.delete("k")
        with pytest.raises(BackendUnavailable):
            await cache.incr("k")
        assert calls == 2
    finally:
        await cache.aclose()
