"""The data cache with the near cache on a real Redis: repeated reads send no
Redis command; another instance's writes are seen within a bounded wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from asgi_redis_kit import Cache, NearCache
from tests.near.cache_app import near_ready
from tests.support import RedisSpy, counting_client

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


@pytest.fixture
async def quiet_near() -> AsyncIterator[NearCache]:
    near = NearCache(heartbeat=60, heartbeat_timeout=5)
    try:
        yield near
    finally:
        await near.aclose()


async def _until_value(cache: Cache, expected: object) -> None:
    """Poll ``get`` until it returns ``expected``; fail after 10 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (found := await cache.get("k")) != expected:
        assert loop.time() < deadline, f"still {found!r}, not {expected!r}"
        await asyncio.sleep(0.01)


async def test_repeated_get_sends_nothing_and_sees_other_writes(
    redis_url: str, key_prefix: str, quiet_near: NearCache
) -> None:
    spy = RedisSpy()
    client = counting_client(redis_url, spy, socket_timeout=5, socket_connect_timeout=5)
    cache = Cache(client, key_prefix=key_prefix, timeout=5, near_cache=quiet_near)
    other = Cache(redis_url, key_prefix=key_prefix, timeout=5)
    try:
        await near_ready(cache)
        await other.set("k", "one", ttl=60)
        # Warm: the first reads fetch from Redis and keep the keys locally.
        for _ in range(3):
            assert await cache.get("k") == "one"
        spy.reset()
        for _ in range(5):
            assert await cache.get("k") == "one"
        assert spy.total == 0, spy.commands
        await other.set("k", "two", ttl=60)
        await _until_value(cache, "two")
        await other.delete("k")
        await _until_value(cache, None)
    finally:
        await cache.aclose()
        await other.aclose()
        await client.aclose()
