"""Last attacks on the data cache before release, on the real server."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from asgi_redis_kit import Cache


async def test_a_counter_started_during_a_memoized_refill_is_not_lost(
    real_redis: Redis, key_prefix: str
) -> None:
    # incr() on a key a refill has read as absent is a later write, like set():
    # the refill must not store over the counter it started.
    cache = Cache(real_redis, key_prefix=key_prefix)
    started = asyncio.Event()
    go_on = asyncio.Event()

    @cache.memoize(ttl=60, key="hits")
    async def load() -> str:
        started.set()
        await go_on.wait()
        return "computed"

    call = asyncio.create_task(load())
    await started.wait()
    assert await cache.incr("hits") == 1
    go_on.set()
    assert await call == "computed"
    assert await cache.get("hits") == 1
    assert await cache.incr("hits") == 2
