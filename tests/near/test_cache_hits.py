"""A hit, a 304 and a HEAD served from the near cache send no Redis command.

The cache's client counts every command it sends (``counting_client``). The
near cache's tracker connection is made from that client's connection class,
so it is counted too: the NearCache here gets a 60 s heartbeat, so once its
tracking is confirmed the tracker sends nothing during the test (no PING), and
every command counted after ``spy.reset()`` is one of the request path."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest

from asgi_redis_kit import Cache, NearCache
from tests.near.cache_app import http, make_app, near_ready, warm
from tests.support import RedisSpy, counting_client

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


@pytest.fixture
async def quiet_near() -> AsyncIterator[NearCache]:
    near = NearCache(heartbeat=60, heartbeat_timeout=5)
    try:
        yield near
    finally:
        await near.aclose()


def counted_cache(url: str, spy: RedisSpy, prefix: str, near: NearCache | bool) -> Cache:
    client = counting_client(url, spy, socket_timeout=5, socket_connect_timeout=5)
    return Cache(client, key_prefix=prefix, timeout=5, near_cache=near)


async def close(cache: Cache) -> None:
    await cache.aclose()
    client = cache.backend.client
    await client.aclose()


async def test_hits_304s_and_heads_send_no_redis_command(
    redis_url: str, key_prefix: str, quiet_near: NearCache
) -> None:
    spy = RedisSpy()
    cache = counted_cache(redis_url, spy, key_prefix, quiet_near)
    calls: Counter[str] = Counter()
    try:
        async with http(make_app(cache, calls)) as client:
            await near_ready(cache)
            first = await client.get("/page")
            assert first.headers["x-cache"] == "MISS"
            # The store dropped its keys locally; the next hit reads them back
            # (one round trip, with their PTTLs) and keeps them.
            await warm(client, spy, "/page")
            etag = (await client.get("/page")).headers["etag"]
            spy.reset()
            for _ in range(5):
                hit = await client.get("/page")
                assert hit.headers["x-cache"] == "HIT"
                assert hit.text == "page 1"
            assert spy.commands == Counter(), "a hit"
            for _ in range(5):
                revalidated = await client.get("/page", headers={"if-none-match": etag})
                assert revalidated.status_code == 304
            assert spy.commands == Counter(), "a 304"
            for _ in range(5):
                head = await client.head("/page")
                assert head.status_code == 200
                assert head.headers["x-cache"] == "HIT"
                assert head.content == b""
            assert spy.commands == Counter(), "a HEAD"
            assert calls["page"] == 1
            assert cache.stats.near_hits >= 15
            near_stats = cache.stats.as_dict()["near"]
            assert near_stats is not None
            assert near_stats["hits"] >= 15
    finally:
        await close(cache)


async def test_commands_per_request_with_and_without_near_cache(
    redis_url: str, key_prefix: str, quiet_near: NearCache
) -> None:
    """What each request costs: the numbers the report gives."""
    costs: dict[bool, dict[str, int]] = {}
    for near_on in (False, True):
        spy = RedisSpy()
        prefix = f"{key_prefix}{int(near_on)}:"
        cache = counted_cache(redis_url, spy, prefix, quiet_near if near_on else False)
        calls: Counter[str] = Counter()
        try:
            async with http(make_app(cache, calls)) as client:
                if near_on:
                    await near_ready(cache)
                await client.get("/short")  # loads the scripts (SCRIPT LOAD)
                spy.reset()
                await client.get("/page")  # miss: lookup (+ lease), run, store
                miss = spy.round_trips
                if near_on:
                    await warm(client, spy, "/page")  # the first hits fill
                spy.reset()
                etag = (await client.get("/page")).headers["etag"]
                hit = spy.round_trips
                spy.reset()
                response = await client.get("/page", headers={"if-none-match": etag})
                assert response.status_code == 304
                not_modified = spy.round_trips
        finally:
            await close(cache)
        costs[near_on] = {"miss": miss, "hit": hit, "304": not_modified}
    assert costs[False] == {"miss": 2, "hit": 1, "304": 1}, costs
    assert costs[True] == {"miss": 2, "hit": 0, "304": 0}, costs


async def test_near_cache_option_is_checked(redis_url: str, key_prefix: str) -> None:
    with pytest.raises(TypeError):
        Cache(redis_url, key_prefix=key_prefix, near_cache=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Cache(redis_url, key_prefix=key_prefix, near_cache="yes")  # type: ignore[arg-type]
    cache = Cache(redis_url, key_prefix=key_prefix, near_cache=True)
    try:
        assert cache.near_cache is NearCache.shared()
    finally:
        await cache.aclose()
    off = Cache(redis_url, key_prefix=key_prefix)
    try:
        assert off.near_cache is None
        assert off.storage is off.redis_layer
        assert off.stats.as_dict()["near"] is None
    finally:
        await off.aclose()


async def test_memory_backend_runs_without_a_near_layer(
    key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="asgi_redis_kit.cache"):
        cache = Cache("memory://near-test", key_prefix=key_prefix, near_cache=True)
    calls: Counter[str] = Counter()
    try:
        assert cache.near_cache is None
        assert cache.storage is cache.redis_layer
        assert [r.levelname for r in caplog.records] == ["INFO"]
        async with http(make_app(cache, calls)) as client:
            assert (await client.get("/page")).headers["x-cache"] == "MISS"
            assert (await client.get("/page")).headers["x-cache"] == "HIT"
    finally:
        await cache.aclose()
