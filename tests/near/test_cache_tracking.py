"""Tracking lost (its connection killed): the cache keeps answering, correctly,
from Redis (one command per hit), and is back to none once tracking is.

On a throwaway redis-server (CLIENT KILL). The tracker's connection is made
from the cache client's (counting) connection class, so its handshake after
the kill is counted too: the request path's commands are the others
(``TRACKER`` names what the tracker sends; its 60 s heartbeat sends no PING
during the test)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache, NearCache
from tests.near.cache_app import body, http, layer, make_app, near_ready
from tests.near.conftest import until
from tests.support import RedisProcess, RedisSpy, counting_client

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]

TRACKER = {"CLIENT", "SUBSCRIBE", "PING", "INFO"}


def request_path(spy: RedisSpy) -> int:
    return sum(n for name, n in spy.commands.items() if name not in TRACKER)


async def test_tracking_lost_means_redis_until_it_is_back(own_redis: RedisProcess) -> None:
    spy = RedisSpy()
    near = NearCache(heartbeat=60, heartbeat_timeout=5)
    redis = counting_client(own_redis.url, spy, socket_timeout=5, socket_connect_timeout=5)
    cache = Cache(redis, key_prefix="loss:", timeout=5, near_cache=near)
    raw = Redis.from_url(own_redis.url, socket_timeout=5)
    calls: Counter[str] = Counter()
    client = http(make_app(cache, calls))

    async def served(expected: str) -> int:
        spy.reset()
        assert await body(client, "/page") == expected
        return request_path(spy)

    async def local(expected: str) -> None:
        for _ in range(50):
            if await served(expected) == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("never served from memory")

    try:
        await near_ready(cache)
        view = layer(cache).view()
        assert await body(client, "/page") == "page 1"
        await local("page 1")
        flushes = near.stats.flushes

        await raw.client_kill_filter(_type="pubsub")
        await until(lambda: not view.usable, 5)
        assert near.stats.flushes > flushes
        lost = 0
        while not view.usable:
            # Nothing kept can be trusted: each hit is its lookup, from Redis.
            assert await served("page 1") == 1
            lost += 1
        assert lost >= 1, "tracking came back before any request"
        assert calls["page"] == 1

        # Tracking is back: from memory again, and other clients' writes
        # reach it again.
        await local("page 1")
        (key,) = [k async for k in raw.scan_iter(match="loss:*:e:*")]
        await raw.delete(key)
        for _ in range(100):
            if await body(client, "/page") == "page 2":
                break
            await asyncio.sleep(0.02)
        assert calls["page"] == 2
        await local("page 2")
    finally:
        await client.aclose()
        await cache.aclose()
        await near.aclose()
        await redis.aclose()
        await raw.aclose()
