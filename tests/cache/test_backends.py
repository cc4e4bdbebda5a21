"""Checklist 40: the logic subset passes on fakeredis and on a real server alike."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from asgi_redis_kit import Cache
from tests.cache.conftest import Calls, Clock, Framework, build, client_for
from tests.support import Arrivals


async def test_core_behaviours_on_fake_and_real_redis(
    framework: Framework, any_redis: Redis, key_prefix: str
) -> None:
    clock = Clock()
    cache = Cache(any_redis, key_prefix=key_prefix, clock=clock)
    gate = asyncio.Event()
    calls = Calls(gate=gate)
    app = Arrivals(build(framework, cache, calls))
    async with client_for(app) as client:
        # Stampede: one handler call for 50 concurrent cold requests (one that has
        # not joined the leader when the gate opens finds its entry).
        pending = asyncio.gather(*(client.get("/page") for _ in range(50)))
        await calls.entered.wait()
        await app.reach(50)
        gate.set()
        responses = await pending
        assert calls["page"] == 1
        assert {r.status_code for r in responses} == {200}
        await client.get("/items/1")
        hit = await client.get("/items/1")
        assert hit.headers["x-cache"] == "HIT"
        # 304 on a matching validator.
        not_modified = await client.get("/items/1", headers={"if-none-match": hit.headers["etag"]})
        assert not_modified.status_code == 304
        # Tags, URL and namespace invalidation.
        await cache.invalidate_tags("item:1")
        assert (await client.get("/items/1")).headers["x-cache"] == "MISS"
        await cache.invalidate("http://testserver/items/1")
        assert (await client.get("/items/1")).headers["x-cache"] == "MISS"
        await cache.clear()
        assert (await client.get("/items/1")).headers["x-cache"] == "MISS"
        # Stale-while-revalidate with one background refresh.
        await client.get("/stale")
        clock.advance(15)
        assert (await client.get("/stale")).headers["x-cache"] == "STALE"
        await cache.wait_background()
        assert calls["stale"] == 2
        # Policy: Set-Cookie is never stored.
        for _ in range(2):
            response = await client.get("/echo?h=set-cookie:a=b")
            assert response.headers["x-cache-reason"] == "set-cookie"
    await cache.aclose()
