"""A local copy never outlives the Redis key it copies (its PTTL, read in the
lookup's round trip) nor the NearCache's ``max_ttl``; stale-while-revalidate
and stale-if-error behave as without a near cache.

"Outlives" is checked against Redis's own deadline: the PTTL read after the
local hit, bounded by when that reply came back (``expires_at <= after +
pttl``), so a copy counted from the wrong moment or with the route's TTL
instead of the key's fails."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache, NearCache
from asgi_redis_kit.near import NearHit
from tests.near.cache_app import body, http, layer, make_app, near_ready, warm
from tests.near.conftest import until
from tests.support import RedisSpy, counting_client

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


class One:
    def __init__(self, cache: Cache, spy: RedisSpy, calls: Counter[str]) -> None:
        self.cache = cache
        self.spy = spy
        self.calls = calls
        self.client = http(make_app(cache, calls))


async def one(redis_url: str, key_prefix: str, near: NearCache) -> AsyncIterator[One]:
    spy = RedisSpy()
    redis = counting_client(redis_url, spy, socket_timeout=5, socket_connect_timeout=5)
    cache = Cache(redis, key_prefix=key_prefix, timeout=5, near_cache=near)
    made = One(cache, spy, Counter())
    try:
        await near_ready(cache)
        yield made
    finally:
        await made.client.aclose()
        await cache.aclose()
        await near.aclose()
        await redis.aclose()


@pytest.fixture
async def app(redis_url: str, key_prefix: str) -> AsyncIterator[One]:
    async for made in one(redis_url, key_prefix, NearCache(heartbeat=60, heartbeat_timeout=5)):
        yield made


async def entry_key(redis: Redis, prefix: str) -> str:
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*:e:*")]
    assert len(keys) == 1, keys
    return str(keys[0].decode())


def local(app: One, key: str) -> NearHit:
    hit = layer(app.cache).view().get(key)
    assert hit is not None, f"{key} is not kept"
    return hit


async def within_redis_deadline(app: One, redis: Redis, key: str) -> NearHit:
    hit = local(app, key)
    pttl = await redis.pttl(key)
    after = asyncio.get_running_loop().time()
    assert pttl > 0
    assert hit.expires_at <= after + pttl / 1000, (hit, pttl)
    return hit


async def test_a_shortened_key_ttl_bounds_the_copy(
    app: One, real_redis: Redis, key_prefix: str
) -> None:
    assert await body(app.client, "/page") == "page 1"
    await warm(app.client, app.spy, "/page")
    key = await entry_key(real_redis, key_prefix)
    assert local(app, key).remaining_ms > 50_000  # the route's 60 s
    # By hand, shorter: PEXPIRE invalidates the copy; the next lookup reads
    # the new PTTL with the entry.
    await real_redis.pexpire(key, 500)
    await until(lambda: layer(app.cache).view().get(key) is None, 2)
    await warm(app.client, app.spy, "/page")
    hit = await within_redis_deadline(app, real_redis, key)
    assert hit.remaining_ms <= 500
    # Past it the copy is gone here, whether or not Redis has announced it.
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, hit.expires_at - loop.time()) + 0.01)
    assert layer(app.cache).view().get(key) is None
    # Redis drops the key: the next requests run the handler again.
    for _ in range(100):
        if await body(app.client, "/page") == "page 2":
            break
        await asyncio.sleep(0.02)
    assert app.calls["page"] == 2


async def test_a_short_route_ttl_bounds_the_copy(
    app: One, real_redis: Redis, key_prefix: str
) -> None:
    assert await body(app.client, "/short") == "short 1"
    await warm(app.client, app.spy, "/short")
    key = await entry_key(real_redis, key_prefix)
    hit = await within_redis_deadline(app, real_redis, key)
    assert hit.remaining_ms <= 1000
    await asyncio.sleep(1.1)
    # Expired in Redis and here: a miss, never the old body.
    assert await body(app.client, "/short") == "short 2"


async def test_max_ttl_bounds_the_copy(redis_url: str, real_redis: Redis, key_prefix: str) -> None:
    near = NearCache(max_ttl=0.3, heartbeat=60, heartbeat_timeout=5)
    async for app in one(redis_url, key_prefix, near):
        assert await body(app.client, "/page") == "page 1"
        await warm(app.client, app.spy, "/page")
        key = await entry_key(real_redis, key_prefix)
        assert local(app, key).remaining_ms <= 300
        await asyncio.sleep(0.35)
        # The copy is gone (Redis still has the entry for a minute): one
        # round trip reads it again, still a hit.
        app.spy.reset()
        response = await app.client.get("/page")
        assert (response.headers["x-cache"], response.text) == ("HIT", "page 1")
        assert app.spy.round_trips == 1
        assert app.calls["page"] == 1


async def test_stale_while_revalidate_serves_the_copy_and_refreshes(app: One) -> None:
    assert await body(app.client, "/stale") == "stale 1"
    await warm(app.client, app.spy, "/stale")
    await asyncio.sleep(1.1)  # past its 1 s freshness, inside the 30 s window
    response = await app.client.get("/stale")
    assert (response.headers["x-cache"], response.text) == ("STALE", "stale 1")
    await app.cache.wait_background()
    assert app.calls["stale"] == 2
    # The refresh's store dropped the old copy here at once.
    fresh = await app.client.get("/stale")
    assert (fresh.headers["x-cache"], fresh.text) == ("HIT", "stale 2")


async def test_stale_if_error_serves_the_copy_when_the_app_fails(app: One) -> None:
    assert await body(app.client, "/flaky") == "flaky 1"
    await warm(app.client, app.spy, "/flaky")
    await asyncio.sleep(1.1)
    app.calls["fail"] = 1
    response = await app.client.get("/flaky")
    assert (response.status_code, response.text, response.headers["x-cache"]) == (
        200,
        "flaky 1",
        "STALE",
    )
    app.calls["fail"] = 0
    response = await app.client.get("/flaky")
    assert (response.headers["x-cache"], response.text) == ("MISS", "flaky 2")
