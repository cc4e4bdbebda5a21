"""Fixtures and helpers for the near-cache tests: a NearCache with a fast
heartbeat, and the read a caller makes (begin, GET + PTTL, put, end)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from asgi_redis_kit.near import NearCache, NearView

pytestmark = pytest.mark.real_redis

HEARTBEAT = 0.2
HEARTBEAT_TIMEOUT = 0.3


@pytest.fixture
async def near() -> AsyncIterator[NearCache]:
    cache = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    try:
        yield cache
    finally:
        await cache.aclose()


async def until(condition: Callable[[], bool], within: float = 10.0) -> float:
    """Wait until ``condition()`` holds; fail after ``within`` s. Returns the wait."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            raise AssertionError(f"not true within {within} s: {condition}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def usable(view: NearView, within: float = 10.0) -> NearView:
    await until(lambda: view.usable, within)
    return view


async def read(view: NearView, client: Redis | RedisCluster, key: str) -> object:
    """What the cache lookup does on a local miss: value and PTTL in one round
    trip, kept if nothing overtook it. Returns the value read from Redis."""
    ticket = view.begin([key])
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            value, pttl = await pipe.execute()
        view.put(ticket, key, value, pttl, len(value or b""))
        return value
    finally:
        view.end(ticket)


async def cached(view: NearView, key: str) -> object:
    """The local value of ``key`` (must be a hit)."""
    hit = view.get(key)
    assert hit is not None, f"{key!r} is not in the near cache"
    return hit.value


async def load(view: NearView, client: Redis | RedisCluster, key: str) -> object:
    """Read ``key`` until its copy is kept, and return it.

    A read is refused when an invalidation of the key arrives while it is in
    flight, including the invalidation of the test's own setup write just
    before it (Redis cannot say which write an invalidation is for), so a test
    that needs the copy reads again; each refused attempt is one such race."""
    for _ in range(100):
        await read(view, client, key)
        hit = view.get(key)
        if hit is not None:
            return hit.value
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key!r} was never kept")
