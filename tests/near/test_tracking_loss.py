"""Tracking lost means flushed and bypassed, then tracked again and trusted again.

Each test runs on a throwaway redis-server (it kills, flushes, pauses or
restarts it). After the loss, invalidations must work again: a tracker that
reconnected without re-enabling tracking (what redis-py's PubSub does) would
serve stale values for ever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from asgi_redis_kit.near import NearCache, NearView
from tests.near.conftest import HEARTBEAT, HEARTBEAT_TIMEOUT, load, until, usable
from tests.support import DelayProxy, RedisProcess

pytestmark = pytest.mark.real_redis

PREFIX = "loss:"
KEY = "loss:k"


@pytest.fixture
async def reader(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def writer(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        yield client
    finally:
        await client.aclose()


async def invalidations_work(view: NearView, reader: Redis, writer: Redis, value: bytes) -> None:
    """A fresh copy is kept, and another client's write drops it."""
    await writer.set(KEY, b"before " + value)
    assert await load(view, reader, KEY) == b"before " + value
    await writer.set(KEY, value)
    await until(lambda: view.get(KEY) is None, 5)
    assert await load(view, reader, KEY) == value


async def lost_and_back(near: NearCache, view: NearView, cause: object) -> None:
    """Run ``cause`` and check the loss was seen: entries flushed, then tracked again."""
    flushes = near.stats.flushes
    assert near.stats.entries == 1
    await cause  # type: ignore[misc]
    await until(lambda: near.stats.flushes > flushes, 10)
    assert near.stats.entries == 0
    await usable(view)
    assert view.get(KEY) is None


async def tracker_ids(client: Redis) -> list[int]:
    return [int(c["id"]) for c in await client.client_list(_type="pubsub")]


async def test_client_kill_type_pubsub(near: NearCache, reader: Redis, writer: Redis) -> None:
    view = await usable(near.view(reader, PREFIX))
    await invalidations_work(view, reader, writer, b"1")
    killed = await tracker_ids(writer)
    assert len(killed) == 1

    async def kill() -> None:
        await writer.client_kill_filter(_type="pubsub")

    await lost_and_back(near, view, kill())
    assert await tracker_ids(writer) not in ([], killed)
    await invalidations_work(view, reader, writer, b"2")


async def test_client_kill_of_the_tracker_by_id(
    near: NearCache, reader: Redis, writer: Redis
) -> None:
    view = await usable(near.view(reader, PREFIX))
    await invalidations_work(view, reader, writer, b"1")
    [tracker] = await tracker_ids(writer)

    async def kill() -> None:
        await writer.client_kill_filter(_id=str(tracker))

    await lost_and_back(near, view, kill())
    # Tracking is on again on the new connection, redirected to itself.
    [info] = await writer.client_list(_type="pubsub")
    assert "t" in info["flags"]
    assert int(info["id"]) != tracker
    await invalidations_work(view, reader, writer, b"2")


async def test_a_write_while_the_tracker_was_gone_is_not_served_stale(
    near: NearCache, reader: Redis, writer: Redis
) -> None:
    """The write lands while nobody listens; the flush is what saves us."""
    view = await usable(near.view(reader, PREFIX))
    await invalidations_work(view, reader, writer, b"old")
    async with writer.pipeline(transaction=True) as pipe:
        pipe.client_kill_filter(_type="pubsub")
        pipe.set(KEY, b"new")  # in the same transaction: no invalidation is sent
        await pipe.execute()
    await until(lambda: not view.usable, 5)
    await usable(view)
    assert view.get(KEY) is None  # no invalidation came: the flush dropped it
    assert await load(view, reader, KEY) == b"new"


async def test_a_server_restart(
    near: NearCache, own_redis: RedisProcess, reader: Redis, writer: Redis
) -> None:
    view = await usable(near.view(reader, PREFIX))
    await invalidations_work(view, reader, writer, b"1")

    async def restart() -> None:
        own_redis.stop()
        await until(lambda: not view.usable, 10)
        assert near.stats.tracking == {f"127.0.0.1:{own_redis.port}": "lost"}
        assert view.get(KEY) is None
        assert view.begin([KEY]) is None
        await asyncio.sleep(3 * HEARTBEAT)  # a few failed reconnects
        assert not view.usable
        own_redis.start()

    await lost_and_back(near, view, restart())
    for client in (reader, writer):  # their pooled connections died with the server
        await client.connection_pool.disconnect()
    await invalidations_work(view, reader, writer, b"2")


async def test_flushdb_by_another_client_drops_everything_but_keeps_tracking(
    near: NearCache, reader: Redis, writer: Redis
) -> None:
    view = await usable(near.view(reader, PREFIX))
    await writer.set("loss:a", b"a")
    await writer.set("loss:b", b"b")
    await load(view, reader, "loss:a")
    await load(view, reader, "loss:b")
    await load(view, reader, "loss:missing")
    flushes = near.stats.flushes
    await writer.flushdb()
    await until(lambda: near.stats.flushes > flushes, 5)
    assert all(view.get(k) is None for k in ("loss:a", "loss:b", "loss:missing"))
    assert view.usable
    await invalidations_work(view, reader, writer, b"after")


async def test_flushall_from_another_db_drops_everything(
    near: NearCache, own_redis: RedisProcess, reader: Redis
) -> None:
    view = await usable(near.view(reader, PREFIX))
    other_db = Redis.from_url(f"redis://127.0.0.1:{own_redis.port}/1")
    try:
        await other_db.set(KEY, b"x")  # db 1: not ours, but still under the prefix
        await load(view, reader, KEY)
        await other_db.flushall()
        await until(lambda: view.get(KEY) is None, 5)
    finally:
        await other_db.aclose()


@pytest.mark.parametrize("hang", ["proxy stops forwarding", "server paused"])
async def test_a_silent_hang_is_noticed_within_heartbeat_plus_timeout(
    near: NearCache, own_redis: RedisProcess, hang: str
) -> None:
    async with DelayProxy(own_redis.port) as proxy:
        client = Redis.from_url(proxy.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            view = await usable(near.view(client, PREFIX))
            await client.set(KEY, b"v")
            await load(view, client, KEY)
            started = time.monotonic()
            if hang == "server paused":
                own_redis.pause()
            else:
                proxy.latency = 3600.0  # every reply from now on is held
            waited = await until(lambda: not view.usable, 10)
            # The bound is heartbeat + heartbeat_timeout; the slack is for a loaded machine.
            assert waited <= HEARTBEAT + HEARTBEAT_TIMEOUT + 1.0, waited
            assert view.get(KEY) is None
            assert near.stats.entries == 0
            # Still hung: it keeps trying, and keeps bypassing.
            await asyncio.sleep(2 * (HEARTBEAT + HEARTBEAT_TIMEOUT))
            assert not view.usable
            assert time.monotonic() - started > HEARTBEAT
            own_redis.resume()
            proxy.latency = 0.0
            await usable(view)
            assert view.get(KEY) is None
            await client.set(KEY, b"after")
            assert await load(view, client, KEY) == b"after"
        finally:
            own_redis.resume()
            await client.aclose()


async def test_the_tracker_authenticates_like_the_client(own_redis: RedisProcess) -> None:
    """The tracking connection is made from the client's own connection options,
    so a password (or TLS, or a db) needs no configuration of ours."""
    admin = Redis.from_url(own_redis.url)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    client = Redis.from_url(f"redis://:s3cret@127.0.0.1:{own_redis.port}/3", socket_timeout=2)
    try:
        view = await usable(near.view(client, PREFIX))
        await invalidations_work(view, client, client, b"authenticated")
        assert "s3cret" not in repr(near.stats.as_dict())
    finally:
        await near.aclose()
        await client.aclose()


async def test_swapdb_is_noticed_though_redis_announces_nothing(
    near: NearCache, own_redis: RedisProcess, reader: Redis, writer: Redis
) -> None:
    """SWAPDB replaces the db's contents and sends no invalidation (Redis 7.0):
    the atomic "rebuild in db 1, then SWAPDB 0 1" must not leave db 0's old
    values served until max_ttl."""
    view = await usable(near.view(reader, PREFIX))
    other_db = Redis.from_url(f"redis://127.0.0.1:{own_redis.port}/1")
    try:
        await writer.set(KEY, b"old")
        await other_db.set(KEY, b"rebuilt")
        assert await load(view, reader, KEY) == b"old"
        await writer.swapdb(0, 1)
        assert await reader.get(KEY) == b"rebuilt"
        await until(lambda: view.get(KEY) is None, HEARTBEAT + HEARTBEAT_TIMEOUT + 2)
        await invalidations_work(view, reader, writer, b"after")
    finally:
        await other_db.aclose()


async def test_the_view_stops_serving_as_soon_as_the_tracker_sees_the_loss(
    near: NearCache, reader: Redis, writer: Redis
) -> None:
    """Between the tracker noticing its connection is gone and the domain
    hearing of it, nothing may await: any other task running then would be
    served entries whose invalidations can no longer arrive. The tracker's own
    state is the only place that moment shows, hence the private look."""
    view = await usable(near.view(reader, PREFIX))
    await invalidations_work(view, reader, writer, b"1")
    [tracker] = view._domain.trackers.values()
    await writer.client_kill_filter(_type="pubsub")
    served_after_loss = 0
    async with asyncio.timeout(5):
        while view.usable or tracker.state == "tracking":
            if tracker.state != "tracking" and view.get(KEY) is not None:
                served_after_loss += 1
            await asyncio.sleep(0)
    assert served_after_loss == 0


async def test_a_blocked_loop_does_not_serve_what_its_tracker_has_not_read(
    near: NearCache, own_redis: RedisProcess, reader: Redis, writer: Redis
) -> None:
    """The loop is blocked longer than heartbeat + heartbeat_timeout while
    another process writes: the invalidation waits unread in the tracker's
    socket, and the first task to run afterwards must not be served the old
    copy (a false loss is fine; staleness is not)."""
    view = await usable(near.view(reader, PREFIX))
    await writer.set(KEY, b"old")
    assert await load(view, reader, KEY) == b"old"
    other = SyncRedis.from_url(own_redis.url, socket_timeout=2)
    try:
        time.sleep(0.1)  # noqa: ASYNC251 -- blocking the loop is the point
        other.set(KEY, b"new")  # announced now, read by nobody: the loop is blocked
        time.sleep(HEARTBEAT + HEARTBEAT_TIMEOUT + 0.3)  # noqa: ASYNC251
        assert view.get(KEY) is None
    finally:
        other.close()
    await usable(view)
    assert await load(view, reader, KEY) == b"new"
