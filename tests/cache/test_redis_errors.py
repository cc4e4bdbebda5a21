"""A full Redis (``maxmemory`` reached, ``noeviction``) answers writes with an OOM
error reply. The cache fails open: a hit is still served (reads work), a miss runs
the handler and answers 200 without storing, a stale entry is served while its
refresh fails quietly; invalidation through the API raises BackendUnavailable (the
caller's to retry), never a raw Redis error. A read-only replica answers READONLY
the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache
from asgi_redis_kit.errors import BackendUnavailable
from tests.cache.conftest import Calls, Clock, build, client_for
from tests.support import RedisProcess, fill_until_oom

pytestmark = pytest.mark.real_redis


@pytest.fixture
async def peek(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(own_redis.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_full_redis_fails_open_on_every_cache_path(
    own_redis: RedisProcess, peek: Redis
) -> None:
    clock = Clock()
    calls = Calls()
    redis: Redis = Redis.from_url(own_redis.url, socket_timeout=5)
    cache = Cache(redis, key_prefix="c:", clock=clock, timeout=5)
    try:
        async with client_for(build("starlette", cache, calls, session=False)) as client:
            assert (await client.get("/page")).headers["x-cache"] == "MISS"
            assert (await client.get("/stale")).headers["x-cache"] == "MISS"
            await fill_until_oom(peek)

            hit = await client.get("/page")
            assert (hit.status_code, hit.headers["x-cache"]) == (200, "HIT")
            assert calls["page"] == 1

            clock.advance(15)  # /stale: ttl=10, stale_while_revalidate=30
            stale = await client.get("/stale")
            assert (stale.status_code, stale.headers["x-cache"]) == (200, "STALE")
            await cache.wait_background()  # its refresh could not take the lease: no error

            for expected in (1, 2):  # a cold miss runs the handler, stores nothing
                miss = await client.get("/items/7")
                assert miss.status_code == 200
                assert calls["item"] == expected
            assert (await client.get("/page")).headers["x-cache"] == "HIT"  # still served

            with pytest.raises(BackendUnavailable):
                await cache.invalidate_tags("items")
            with pytest.raises(BackendUnavailable):
                await cache.clear()
            with pytest.raises(BackendUnavailable):
                await cache.invalidate("http://testserver/page")

            # Served, from the cache or (the breaker opened after the failures in a
            # row above) without it.
            assert (await client.get("/page")).status_code == 200
    finally:
        await cache.aclose()
        await redis.aclose()


async def test_a_read_only_replica_fails_open_too(own_redis: RedisProcess, peek: Redis) -> None:
    primary = RedisProcess().start()
    redis: Redis = Redis.from_url(own_redis.url, socket_timeout=5)
    cache = Cache(redis, key_prefix="c:", clock=Clock(), timeout=5)
    calls = Calls()
    try:
        await peek.replicaof("127.0.0.1", primary.port)
        async with client_for(build("starlette", cache, calls, session=False)) as client:
            for expected in (1, 2):
                response = await client.get("/items/3")
                assert response.status_code == 200
                assert calls["item"] == expected
        with pytest.raises(BackendUnavailable):
            await cache.invalidate_tags("items")
    finally:
        await peek.replicaof("NO", "ONE")
        await cache.aclose()
        await redis.aclose()
        primary.close()
