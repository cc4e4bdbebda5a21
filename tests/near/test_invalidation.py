"""Another client's write reaches every near cache that holds the key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_redis_kit.near import ABSENT, NearCache
from tests.near.conftest import HEARTBEAT, HEARTBEAT_TIMEOUT, cached, load, read, until, usable

pytestmark = pytest.mark.real_redis


@pytest.fixture
async def reader(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda c, k: c.set(k, b"new"), id="SET"),
        pytest.param(lambda c, k: c.delete(k), id="DEL"),
        pytest.param(lambda c, k: c.expire(k, 100), id="EXPIRE"),
        pytest.param(lambda c, k: c.append(k, b"+"), id="APPEND"),
    ],
)
async def test_a_write_by_another_client_invalidates(
    near: NearCache, reader: Redis, real_redis: Redis, key_prefix: str, write: object
) -> None:
    view = await usable(near.view(reader, key_prefix))
    key = f"{key_prefix}k"
    await real_redis.set(key, b"old")
    assert await load(view, reader, key) == b"old"
    await write(real_redis, key)  # type: ignore[operator]
    await until(lambda: view.get(key) is None, 5)
    assert near.stats.invalidations >= 1


async def test_a_missing_key_is_cached_as_absent_until_it_is_written(
    near: NearCache, reader: Redis, real_redis: Redis, key_prefix: str
) -> None:
    view = await usable(near.view(reader, key_prefix))
    key = f"{key_prefix}missing"
    assert await read(view, reader, key) is None
    hit = view.get(key)
    assert hit is not None
    assert hit.value is ABSENT
    await real_redis.set(key, b"now here")
    await until(lambda: view.get(key) is None, 5)
    assert await load(view, reader, key) == b"now here"


async def test_redis_expiring_the_key_invalidates_and_the_local_deadline_never_lags(
    near: NearCache, reader: Redis, real_redis: Redis, key_prefix: str
) -> None:
    view = await usable(near.view(reader, key_prefix))
    key = f"{key_prefix}short"
    await real_redis.set(key, b"v", px=300)
    assert await load(view, reader, key) == b"v"
    hit = view.get(key)
    assert hit is not None
    assert 0 < hit.remaining_ms <= 300
    loop = asyncio.get_running_loop()
    invalidations = near.stats.invalidations
    # The local copy dies at the key's own deadline at the latest.
    await until(lambda: view.get(key) is None, 5)
    assert loop.time() >= hit.expires_at - 0.001
    # Redis deletes it by active expiry soon after, and announces that.
    await until(lambda: near.stats.invalidations > invalidations, 5)
    assert await load(view, reader, key) is ABSENT


async def test_max_ttl_caps_a_key_without_ttl_and_a_long_pttl(
    reader: Redis, real_redis: Redis, key_prefix: str
) -> None:
    near = NearCache(max_ttl=0.3, heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    try:
        view = await usable(near.view(reader, key_prefix))
        forever, long = f"{key_prefix}forever", f"{key_prefix}long"
        await real_redis.set(forever, b"1")
        await real_redis.set(long, b"2", ex=3600)
        for key in (forever, long):
            await load(view, reader, key)
            hit = view.get(key)
            assert hit is not None
            assert hit.remaining_ms <= 300
        await until(lambda: view.get(forever) is None and view.get(long) is None, 5)
        assert near.stats.expirations == 2
        # Redis still has both: only the local copies expired.
        assert await real_redis.exists(forever, long) == 2
    finally:
        await near.aclose()


async def test_our_own_write_is_dropped_at_once(
    near: NearCache, reader: Redis, real_redis: Redis, key_prefix: str
) -> None:
    view = await usable(near.view(reader, key_prefix))
    key = f"{key_prefix}mine"
    await real_redis.set(key, b"old")
    await load(view, reader, key)
    ticket = view.begin([key])  # a read in flight when we write
    view.invalidate([key])
    assert view.get(key) is None
    view.put(ticket, key, b"old", -1, 3)
    view.end(ticket)
    assert view.get(key) is None


async def test_two_app_instances_see_each_others_writes(
    reader: Redis, redis_url: str, key_prefix: str
) -> None:
    """Two NearCache instances with their own clients stand for two processes."""
    a = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    b = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    other = Redis.from_url(redis_url, socket_timeout=5)
    try:
        view_a = await usable(a.view(reader, key_prefix))
        view_b = await usable(b.view(other, key_prefix))
        key = f"{key_prefix}shared"
        await reader.set(key, b"1")
        for view, client in ((view_a, reader), (view_b, other)):
            assert await load(view, client, key) == b"1"
        # A writes (and drops its own copy); B must hear of it.
        await reader.set(key, b"2")
        view_a.invalidate([key])
        await until(lambda: view_b.get(key) is None, 5)
        assert await read(view_b, other, key) == b"2"
        # And the other way round, many times: never a stale read after the lag.
        for i in range(3, 23):
            await load(view_a, reader, key)
            await other.set(key, str(i).encode())
            view_b.invalidate([key])
            await until(lambda: view_a.get(key) is None, 5)
        assert await read(view_a, reader, key) == b"22"
    finally:
        await a.aclose()
        await b.aclose()
        await other.aclose()


async def test_keys_outside_the_prefix_are_not_kept(
    near: NearCache, reader: Redis, key_prefix: str
) -> None:
    view = await usable(near.view(reader, f"{key_prefix}in:"))
    outside = f"{key_prefix}out:k"
    await read(view, reader, outside)
    assert view.get(outside) is None
    assert near.stats.stores == 0


async def test_overlapping_prefixes_track_the_shorter_and_both_views_work(
    near: NearCache, reader: Redis, real_redis: Redis, key_prefix: str
) -> None:
    long_view = await usable(near.view(reader, f"{key_prefix}a:b:"))
    short_view = near.view(reader, f"{key_prefix}a:")
    # Registering the shorter prefix re-registered the tracker: not usable until
    # Redis has confirmed it (BCAST refuses overlapping prefixes on one connection).
    await usable(short_view)
    assert long_view.usable
    assert near.view(reader, f"{key_prefix}a:b:c:") is not None  # covered: no re-register
    assert short_view.usable
    deep, shallow = f"{key_prefix}a:b:k", f"{key_prefix}a:k"
    await real_redis.set(deep, b"d")
    await real_redis.set(shallow, b"s")
    assert await load(long_view, reader, deep) == b"d"
    assert await load(short_view, reader, shallow) == b"s"
    await real_redis.set(deep, b"d2")
    await real_redis.set(shallow, b"s2")
    await until(lambda: long_view.get(deep) is None and short_view.get(shallow) is None, 5)
    assert list(near.stats.tracking.values()) == ["tracking"]


async def test_views_of_one_server_share_one_tracker(
    near: NearCache, reader: Redis, redis_url: str, key_prefix: str
) -> None:
    other = Redis.from_url(redis_url, socket_timeout=5)
    try:
        first = await usable(near.view(reader, key_prefix))
        second = near.view(other, key_prefix)
        assert second is first
        third = await usable(near.view(other, f"{key_prefix}other:"))
        assert len(near.stats.tracking) == 1
        assert (await reader.client_list(_type="pubsub")) is not None
        assert third.usable
    finally:
        await other.aclose()


async def test_a_new_prefix_on_a_running_tracker_re_registers_and_both_work(
    near: NearCache, reader: Redis, real_redis: Redis, key_prefix: str
) -> None:
    first = await usable(near.view(reader, f"{key_prefix}one:"))
    one, two = f"{key_prefix}one:k", f"{key_prefix}two:k"
    await real_redis.set(one, b"1")
    await load(first, reader, one)
    flushes = near.stats.flushes
    second = near.view(reader, f"{key_prefix}two:")
    # Re-registering drops what we hold: the new registration starts from nothing.
    assert near.stats.flushes == flushes + 1
    assert near.stats.entries == 0
    await usable(second)
    await real_redis.set(two, b"2")
    assert await load(first, reader, one) == b"1"
    assert await load(second, reader, two) == b"2"
    await real_redis.set(one, b"1+")
    await real_redis.set(two, b"2+")
    await until(lambda: first.get(one) is None and second.get(two) is None, 5)
    [tracker] = await real_redis.client_list(_type="pubsub")
    assert "t" in tracker["flags"]


async def test_heartbeats_keep_a_quiet_view_usable(
    near: NearCache, reader: Redis, real_redis: Redis, key_prefix: str
) -> None:
    """Many heartbeats with nothing else on the connection: every PONG is seen."""
    view = await usable(near.view(reader, key_prefix))
    key = f"{key_prefix}quiet"
    await real_redis.set(key, b"q")
    await load(view, reader, key)
    flushes = near.stats.flushes
    for _ in range(10):
        await asyncio.sleep(HEARTBEAT_TIMEOUT)
        assert view.usable
    assert near.stats.flushes == flushes
    assert await cached(view, key) == b"q"


@pytest.mark.parametrize(
    ("encoding", "errors"), [("latin-1", "strict"), ("utf-8", "surrogateescape")]
)
async def test_a_key_is_invalidated_whatever_the_clients_key_encoding(
    near: NearCache, redis_url: str, key_prefix: str, encoding: str, errors: str
) -> None:
    """The key str the caller uses is what the client's encoding makes of the
    invalidated bytes; decoding them as UTF-8 would leave the copy for ever."""
    client = Redis.from_url(redis_url, socket_timeout=5, encoding=encoding, encoding_errors=errors)
    raw = Redis.from_url(redis_url, socket_timeout=5)
    try:
        key = f"{key_prefix}\xe9t\xe9" if encoding == "latin-1" else f"{key_prefix}\udce9"
        wire = key.encode(encoding, errors)
        assert wire.endswith(b"\xe9t\xe9") or wire.endswith(b"\xe9")  # not UTF-8
        view = await usable(near.view(client, key_prefix))
        await client.set(key, b"old")
        assert await load(view, client, key) == b"old"
        await raw.set(wire, b"new")
        await until(lambda: view.get(key) is None, 5)
    finally:
        await client.aclose()
        await raw.aclose()


async def test_a_key_a_lossy_encoding_cannot_give_back_is_not_kept(
    near: NearCache, redis_url: str, key_prefix: str
) -> None:
    """With errors="replace", "\u4e00" and "?" are both the key b"?": an
    invalidation of it could drop only one of them, so neither str is kept
    unless it comes back as itself."""
    client = Redis.from_url(
        redis_url, socket_timeout=5, encoding="latin-1", encoding_errors="replace"
    )
    try:
        view = await usable(near.view(client, key_prefix))
        await read(view, client, f"{key_prefix}\u4e00")
        assert view.get(f"{key_prefix}\u4e00") is None
        assert await load(view, client, f"{key_prefix}plain") is ABSENT
    finally:
        await client.aclose()
