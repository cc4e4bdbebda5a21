"""A read reply overtaken by an invalidation is never kept.

The reply comes on the client's connection and the invalidation on the
tracker's, so a write can land between the two: Redis ran our GET, then
another client's SET, and announced the SET before our GET's reply reached us.
The DelayProxy holds the read's reply back to open exactly that window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_redis_kit.near import NearCache, NearView
from tests.near.conftest import until, usable
from tests.support import DelayProxy, RedisProcess

pytestmark = pytest.mark.real_redis

PREFIX = "race:"
KEY = "race:k"


@pytest.fixture
async def direct(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def slow(proxy: DelayProxy) -> AsyncIterator[Redis]:
    """A client whose replies the proxy may hold back."""
    client = Redis.from_url(proxy.url, socket_timeout=10)
    await client.ping()  # connected (and handshaken) before any latency
    try:
        yield client
    finally:
        await client.aclose()


async def held_read(
    view: NearView, slow: Redis, proxy: DelayProxy, meanwhile: object
) -> tuple[object, int]:
    """begin -> GET+PTTL whose reply is held -> ``meanwhile`` -> reply -> put."""
    proxy.latency = 1.0
    ticket = view.begin([KEY])
    try:
        replies = proxy.chunks["replies"]

        async def get() -> list[object]:
            async with slow.pipeline(transaction=False) as pipe:
                pipe.get(KEY)
                pipe.pttl(KEY)
                return await pipe.execute()

        reading = asyncio.create_task(get())
        await proxy.until_chunks("replies", replies + 1)  # ran in Redis; reply held
        await meanwhile  # type: ignore[misc]
        value, pttl = await reading
        assert isinstance(pttl, int)
        view.put(ticket, KEY, value, pttl, 8)
        return value, pttl
    finally:
        view.end(ticket)
        proxy.latency = 0.0


async def test_a_reply_overtaken_by_an_invalidation_is_not_kept(
    near: NearCache, direct: Redis, slow: Redis, proxy: DelayProxy
) -> None:
    view = await usable(near.view(direct, PREFIX))
    await direct.set(KEY, b"old")
    await until(lambda: near.stats.invalidations >= 1, 5)  # the setup write's own

    async def write_and_hear_of_it() -> None:
        seen = near.stats.invalidations
        await direct.set(KEY, b"new")
        await until(lambda: near.stats.invalidations > seen, 5)

    value, _ = await held_read(view, slow, proxy, write_and_hear_of_it())
    assert value == b"old"  # the held reply is the stale one
    assert view.get(KEY) is None
    assert near.stats.refused == 1
    assert near.stats.stores == 0


async def test_a_held_reply_without_a_write_meanwhile_is_kept(
    near: NearCache, direct: Redis, slow: Redis, proxy: DelayProxy
) -> None:
    """The control: the same held read, with no write in the window, is kept
    (so the test above fails if put() refused everything)."""
    view = await usable(near.view(direct, PREFIX))
    await direct.set(KEY, b"old")
    await until(lambda: near.stats.invalidations >= 1, 5)
    value, _ = await held_read(view, slow, proxy, asyncio.sleep(0.05))
    assert value == b"old"
    hit = view.get(KEY)
    assert hit is not None
    assert hit.value == b"old"


async def test_a_flush_while_the_reply_is_held_refuses_it(
    near: NearCache, direct: Redis, slow: Redis, proxy: DelayProxy
) -> None:
    view = await usable(near.view(direct, PREFIX))
    await direct.set(KEY, b"old")
    await until(lambda: near.stats.invalidations >= 1, 5)

    async def flush_and_hear_of_it() -> None:
        flushes = near.stats.flushes
        await direct.flushdb()
        await until(lambda: near.stats.flushes > flushes, 5)

    await held_read(view, slow, proxy, flush_and_hear_of_it())
    assert view.get(KEY) is None
    assert view.usable  # a flush is not a loss of tracking


async def test_an_older_read_of_another_key_is_unaffected(
    near: NearCache, direct: Redis, slow: Redis, proxy: DelayProxy
) -> None:
    """Pending state is per key: a write to another key does not refuse ours."""
    view = await usable(near.view(direct, PREFIX))
    await direct.set(KEY, b"old")
    await until(lambda: near.stats.invalidations >= 1, 5)

    async def write_another_key() -> None:
        seen = near.stats.invalidations
        await direct.set("race:other", b"x")
        await until(lambda: near.stats.invalidations > seen, 5)

    await held_read(view, slow, proxy, write_another_key())
    hit = view.get(KEY)
    assert hit is not None
    assert hit.value == b"old"


async def test_tracking_lost_and_back_while_the_reply_is_held_refuses_it(
    near: NearCache, direct: Redis, slow: Redis, proxy: DelayProxy
) -> None:
    """The tracker is killed and reconnects within the window: the view is
    usable again when the reply lands, but the reply's epoch is gone."""
    view = await usable(near.view(direct, PREFIX))
    await direct.set(KEY, b"old")
    await until(lambda: near.stats.invalidations >= 1, 5)

    async def kill_and_come_back() -> None:
        flushes = near.stats.flushes
        await direct.client_kill_filter(_type="pubsub")
        await until(lambda: near.stats.flushes > flushes, 5)
        await usable(view)

    await held_read(view, slow, proxy, kill_and_come_back())
    assert view.usable
    assert view.get(KEY) is None
    assert near.stats.refused == 1


async def test_a_held_reply_is_not_served_past_the_keys_expiry_in_redis(
    near: NearCache, direct: Redis, slow: Redis, proxy: DelayProxy
) -> None:
    """The PTTL counts from when Redis ran the read, not from when its reply
    arrived: a reply held 1 s with 300 ms left is already expired when it lands.
    CLIENT PAUSE WRITE stops Redis's own expiry, so no invalidation saves us."""
    view = await usable(near.view(direct, PREFIX))
    await direct.set(KEY, b"old", px=300)
    await until(lambda: near.stats.invalidations >= 1, 5)

    async def pause_expiry() -> None:
        await direct.client_pause(5000, all=False)

    try:
        value, pttl = await held_read(view, slow, proxy, pause_expiry())
        assert value == b"old"
        assert pttl > 0
        assert await direct.get(KEY) is None  # expired in Redis (not yet deleted)
        assert view.get(KEY) is None
    finally:
        await direct.client_unpause()
