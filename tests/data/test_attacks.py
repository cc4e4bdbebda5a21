"""Attacks on the data cache (values, counters, @cache.memoize), on the real server."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache
from tests.support import RedisProcess


async def test_set_during_a_memoized_refill_is_not_lost(real_redis: Redis, key_prefix: str) -> None:
    # A refill that read the value's version before a set() must not store over
    # the set: the set is the later write, and get() must return it.
    cache = Cache(real_redis, key_prefix=key_prefix)
    started = asyncio.Event()
    go_on = asyncio.Event()

    @cache.memoize(ttl=60, key="item:{n}")
    async def load(n: int) -> str:
        started.set()
        await go_on.wait()
        return "computed"

    call = asyncio.create_task(load(1))
    await started.wait()
    await cache.set("item:1", "set-later")
    go_on.set()
    assert await call == "computed"
    assert await cache.get("item:1") == "set-later"


async def test_set_with_tags_during_a_memoized_refill_keeps_its_tags(
    real_redis: Redis, key_prefix: str
) -> None:
    # The refill must not replace the set's record (its tags) either: the value
    # set with a tag is dropped by invalidate_tags.
    cache = Cache(real_redis, key_prefix=key_prefix)
    started = asyncio.Event()
    go_on = asyncio.Event()

    @cache.memoize(ttl=60, key="item:{n}")
    async def load(n: int) -> str:
        started.set()
        await go_on.wait()
        return "computed"

    call = asyncio.create_task(load(2))
    await started.wait()
    await cache.set("item:2", "tagged", tags=["t"])
    go_on.set()
    await call
    other = Cache(real_redis, key_prefix=key_prefix)  # a process that never saw the set
    assert await other.get("item:2") == "tagged"
    await cache.invalidate_tags("t")
    assert await other.get("item:2") is None


async def test_many_keys_at_once_do_not_exhaust_the_pool(own_redis: RedisProcess) -> None:
    # get_many/set_many of many keys: one command per key at once waits on the
    # connection pool past the timeout, fails, and opens the breaker for every
    # other caller of the cache.
    # 0.5 s: sent all at once they still fail here; a loaded CI machine must not.
    cache = Cache(own_redis.url, key_prefix="many:", max_connections=4, timeout=0.5)
    try:
        values = {f"k{i}": i for i in range(2000)}
        await cache.set_many(values)
        assert await cache.get_many(list(values)) == list(values.values())
        assert await cache.get("k1") == 1
    finally:
        await cache.aclose()


async def test_incr_refuses_a_value_stored_with_tags(real_redis: Redis, key_prefix: str) -> None:
    # incr() on a key holding a value that is not a counter is a TypeError and
    # writes nothing, tags or none: the tagged value must not be replaced by 1.
    cache = Cache(real_redis, key_prefix=key_prefix)
    await cache.set("k", "hello", tags=["a"])
    with pytest.raises(TypeError):
        await cache.incr("k")
    assert await cache.get("k") == "hello"
