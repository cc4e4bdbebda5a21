"""Sessions on the near cache: Redis commands per request, counted by RedisSpy.

A tracker's connection is made from the client's connection class, so the spy
counts its commands too. The counting tests use a NearCache with a 30 s
heartbeat (no PING during the test) and count only request-path commands
(``request_commands`` leaves out PING/CLIENT/SUBSCRIBE/ROLE/HELLO); the round
trips are then the request's own.

Measured (steady state): a read-only request is 1 round trip (EVALSHA) without
the near cache and 0 with it; a visit counter (``await incr()`` per request) is
2 with or without (its own write drops the copy, so each load goes to Redis).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import SessionMiddleware, SessionStore
from asgi_redis_kit.near import NearCache
from tests.near.conftest import HEARTBEAT, until
from tests.support import RedisProcess, RedisSpy, counting_client

from .session_app import (
    SLACK_TIMEOUT,
    http,
    read_until_local,
    request_commands,
    session_app,
    store_of,
    usable,
)

pytestmark = pytest.mark.real_redis


@pytest.fixture
async def quiet_near() -> AsyncIterator[NearCache]:
    near = NearCache(heartbeat=30, heartbeat_timeout=5)
    try:
        yield near
    finally:
        await near.aclose()


async def test_read_only_request_sends_no_command(
    real_redis: Redis, spy: RedisSpy, key_prefix: str, quiet_near: NearCache
) -> None:
    app = session_app(real_redis, key_prefix, quiet_near)
    async with http(app) as client:
        await client.post("/set", json={"visits": 1})
        await client.get("/read")  # starts tracking
        await usable(quiet_near)
        assert await read_until_local(client, quiet_near) == {"visits": 1}
        for _ in range(5):
            spy.reset()
            response = await client.get("/read")
            assert response.json() == {"visits": 1}
            assert spy.round_trips == 0
            assert spy.total == 0
    assert store_of(app).near_stats is quiet_near.stats


@pytest.mark.parametrize("near", [False, True])
async def test_visit_counter_keeps_its_round_trips(
    real_redis: Redis, spy: RedisSpy, key_prefix: str, quiet_near: NearCache, near: bool
) -> None:
    app = session_app(real_redis, key_prefix, quiet_near if near else False)
    async with http(app) as client:
        await client.post("/incr/visits")
        await client.get("/read")
        if near:
            await usable(quiet_near)
        for visit in range(2, 8):
            spy.reset()
            response = await client.post("/incr/visits")
            assert response.text == str(visit)
            assert spy.round_trips == 2
            assert request_commands(spy) == {"EVALSHA": 2}


async def test_read_only_request_without_near_cache_is_one_round_trip(
    real_redis: Redis, spy: RedisSpy, key_prefix: str
) -> None:
    # The baseline the zero above is measured against.
    app = session_app(real_redis, key_prefix, False)
    async with http(app) as client:
        await client.post("/set", json={"visits": 1})
        for _ in range(3):
            spy.reset()
            assert (await client.get("/read")).json() == {"visits": 1}
            assert spy.round_trips == 1
            assert request_commands(spy) == {"EVALSHA": 1}
    assert store_of(app).near_stats is None


async def test_tracking_lost_then_back(own_redis: RedisProcess, key_prefix: str) -> None:
    spy = RedisSpy()
    redis = counting_client(own_redis.url, spy, socket_timeout=5)
    raw = Redis.from_url(own_redis.url)
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=SLACK_TIMEOUT)
    app = session_app(redis, key_prefix, near)
    try:
        async with http(app) as client:
            await client.post("/set", json={"n": 1})
            await client.get("/read")
            await usable(near)
            assert await read_until_local(client, near) == {"n": 1}
            flushes = near.stats.flushes
            await raw.client_kill_filter(_type="pubsub")
            await until(lambda: near.stats.flushes > flushes, 10)
            # Whatever the tracker does now, a write it may not have seen is seen.
            (key,) = [k async for k in raw.scan_iter(match=f"{key_prefix}*")]
            await raw.hset(key, "d:n", b"2")
            spy.reset()
            assert (await client.get("/read")).json() == {"n": 2}
            assert request_commands(spy) == {"EVALSHA": 1}
            # Tracked again: back to no command.
            await usable(near)
            assert await read_until_local(client, near) == {"n": 2}
            spy.reset()
            assert (await client.get("/read")).json() == {"n": 2}
            assert request_commands(spy) == {}
            # And invalidations work again.
            await raw.hset(key, "d:n", b"3")
            await until(lambda: near.stats.entries == 0, 5)
            assert (await client.get("/read")).json() == {"n": 3}
    finally:
        await near.aclose()
        await redis.aclose()
        await raw.aclose()


def test_near_cache_argument_is_checked() -> None:
    with pytest.raises(TypeError, match="near_cache"):
        SessionStore("redis://127.0.0.1:1/0", near_cache="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="near_cache"):
        SessionStore("redis://127.0.0.1:1/0", near_cache=1)  # type: ignore[arg-type]
    store = SessionStore("redis://127.0.0.1:1/0", near_cache=True)
    assert store.near is NearCache.shared()
    given = SessionStore("redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="near_cache"):
        SessionMiddleware(lambda *a: None, secret_key="k", store=given, near_cache=True)  # type: ignore[arg-type]
    middleware = SessionMiddleware(lambda *a: None, secret_key="k", near_cache=True)  # type: ignore[arg-type]
    assert middleware.store.near is NearCache.shared()


async def test_memory_runs_without_tracking(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="asgi_redis_kit.sessions"):
        store = SessionStore("memory://near-session-test", near_cache=True)
    assert store.near is None
    assert store.near_stats is None
    assert "CLIENT TRACKING" in caplog.text
    assert await store.load("nosuch") is None
    await store.aclose()


def test_the_scripts_listed_as_reads_never_write() -> None:
    # Their keys keep their local copies (sessions._near.READS): a write added to
    # one of them would be served stale by every instance that holds a copy.
    from asgi_redis_kit.sessions._near import READS, written_keys
    from asgi_redis_kit.sessions._scripts import SCRIPTS, script

    writes = ("HSET", "HDEL", "DEL", "UNLINK", "EXPIRE", "PEXPIRE", "SADD", "SREM", "HINCRBY")
    reads = [each for each in SCRIPTS if each.sha in READS]
    assert len(reads) == 3
    for each in reads:
        assert not any(f"'{name}'" in each.text.upper() for name in writes), each.text
        assert written_keys([script(each, "k:1")]) == []
    others = [each for each in SCRIPTS if each.sha not in READS]
    assert all(written_keys([script(each, "k:1", "x")]) == ["k:1"] for each in others)
    assert written_keys([("SREM", "k:u", "id"), ("SMEMBERS", "k:v"), ("PEXPIRE", b"k:2", 5)]) == [
        "k:u",
        "k:2",
    ]
