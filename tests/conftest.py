"""One Redis fixture for the whole suite.

``redis_url`` is ``REDIS_URL`` when set, otherwise a throwaway ``redis-server``
started for this test session. Every test gets its own ``key_prefix`` so the
suite never depends on an empty Redis. ``fake_redis`` is an in-process
fakeredis for fast logic tests, and ``any_redis`` runs a test on both.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import fakeredis
import pytest
from redis.asyncio import Redis

from tests.support import DelayProxy, RedisProcess, RedisSpy, counting_client


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = RedisProcess().start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own, for killing, pausing and restarting."""
    server = RedisProcess().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def admin(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    """A direct client of ``own_redis`` (never through a proxy), to seed,
    count and inspect."""
    client = Redis.from_url(own_redis.url, socket_timeout=10)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def proxy(own_redis: RedisProcess) -> AsyncIterator[DelayProxy]:
    """A :class:`DelayProxy` in front of ``own_redis``."""
    async with DelayProxy(own_redis.port) as running:
        yield running


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def spy() -> RedisSpy:
    return RedisSpy()


@pytest.fixture
async def real_redis(redis_url: str, key_prefix: str, spy: RedisSpy) -> AsyncIterator[Redis]:
    """A client on the real server whose commands ``spy`` counts.

    Keys under this test's prefix are removed afterwards (SCAN is fine in a
    test; the library itself never scans)."""
    client = counting_client(redis_url, spy, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def fake_redis() -> AsyncIterator[Redis]:
    client: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["fake", "real"])
async def any_redis(
    request: pytest.FixtureRequest, key_prefix: str, spy: RedisSpy
) -> AsyncIterator[Redis]:
    """The same behaviour test against fakeredis and a real server."""
    if request.param == "fake":
        client: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        try:
            yield client
        finally:
            await client.aclose()
        return
    url: str = request.getfixturevalue("redis_url")
    real = counting_client(url, spy, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield real
    finally:
        keys = [key async for key in real.scan_iter(match=f"{key_prefix}*", count=1000)]
        if keys:
            await real.delete(*keys)
        await real.aclose()
