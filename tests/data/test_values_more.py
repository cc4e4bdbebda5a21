"""The data cache's value API against a real Redis: the seed example, None as
a value, bad input refused before any Redis command, exceptions not cached."""

from __future__ import annotations

import asyncio
import math

import pytest
from redis.asyncio import Redis

from asgi_redis_kit.cache import MAX_KEY_LENGTH, Cache
from tests.support import RedisSpy


async def test_seed_example_and_ttl(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    await cache.set("clave", "valor", ttl=1)
    assert await cache.get("clave") == "valor"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while await cache.get("clave") is not None:
        assert loop.time() < deadline, "the value outlived its TTL"
        await asyncio.sleep(0.1)
    assert not await cache.exists("clave")


async def test_none_is_a_value(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    await cache.set("nothing", None, ttl=60)
    assert await cache.exists("nothing")
    assert await cache.get("nothing", default="miss") is None
    assert await cache.get("absent", default="miss") == "miss"
    assert not await cache.exists("absent")


@pytest.mark.parametrize(
    ("key", "error"),
    [(1, TypeError), (b"k", TypeError), ("", ValueError), ("k" * (MAX_KEY_LENGTH + 1), ValueError)],
)
async def test_bad_keys_send_nothing(
    real_redis: Redis, key_prefix: str, spy: RedisSpy, key: object, error: type[Exception]
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    spy.reset()
    with pytest.raises(error):
        await cache.set(key, "v", ttl=60)  # type: ignore[arg-type]
    with pytest.raises(error):
        await cache.get(key)  # type: ignore[arg-type]
    assert spy.total == 0


@pytest.mark.parametrize("ttl", [0, -1, math.nan, True, "60"])
async def test_bad_ttls_send_nothing(
    real_redis: Redis, key_prefix: str, spy: RedisSpy, ttl: object
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    spy.reset()
    with pytest.raises((TypeError, ValueError)):
        await cache.set("k", "v", ttl=ttl)  # type: ignore[arg-type]
    assert spy.total == 0
    assert not await cache.exists("k")


@pytest.mark.parametrize("value", [{1, 2}, object()])
async def test_unencodable_values_send_nothing(
    real_redis: Redis, key_prefix: str, spy: RedisSpy, value: object
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    spy.reset()
    with pytest.raises(TypeError):
        await cache.set("k", value, ttl=60)
    assert spy.total == 0


async def test_exceptions_are_not_cached(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = 0

    @cache.memoize(ttl=60)
    async def flaky(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return x * 2

    with pytest.raises(RuntimeError):
        await flaky(1)
    assert await flaky(1) == 2
    assert await flaky(1) == 2
    assert calls == 2


async def test_equivalent_calls_share_one_entry(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = 0

    @cache.memoize(ttl=60)
    async def f(x: int, y: int = 3) -> int:
        nonlocal calls
        calls += 1
        return x + y

    assert await f(1) == 4
    assert await f(x=1) == 4
    assert await f(1, y=3) == 4
    assert calls == 1


async def test_incr_is_atomic_across_instances(
    real_redis: Redis, key_prefix: str, redis_url: str
) -> None:
    other = Redis.from_url(redis_url)
    try:
        # A 5 s deadline: the burst opens ~100 fresh connections, which a loaded
        # machine may not do in the default 0.5 s; this test is about atomicity.
        caches = [
            Cache(real_redis, key_prefix=key_prefix, timeout=5),
            Cache(other, key_prefix=key_prefix, timeout=5),
        ]
        await asyncio.gather(*(caches[i % 2].incr("n", ttl=60) for i in range(200)))
        assert await caches[0].get("n") == 200
    finally:
        await other.aclose()
