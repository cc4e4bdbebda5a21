"""Sessions on the near cache, two app instances on one Redis: what one instance
(or an admin script, or a raw client) does ends the other's local copy.

Each instance has its own client and its own NearCache, as two processes would.
Bounds are generous (B stops serving the old session within 2 s) and nothing is
a timed speed assertion. Each test runs on a throwaway redis-server (FLUSHDB)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette

from asgi_redis_kit import SessionStore
from asgi_redis_kit.near import NearCache
from tests.near.conftest import HEARTBEAT, until
from tests.support import DelayProxy, RedisProcess

from .session_app import (
    SLACK_TIMEOUT,
    http,
    read_until_local,
    session_app,
    store_of,
    until_page,
    usable,
)

pytestmark = pytest.mark.real_redis

PREFIX = "ns:"


@dataclass
class Instance:
    near: NearCache
    app: Starlette
    client: httpx.AsyncClient


@pytest.fixture
async def raw(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def make_instance(own_redis: RedisProcess) -> AsyncIterator[object]:
    made: list[tuple[NearCache, Redis, httpx.AsyncClient]] = []

    def make(url: str | None = None, **options: object) -> Instance:
        near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=SLACK_TIMEOUT)
        redis = Redis.from_url(url or own_redis.url, socket_timeout=5)
        app = session_app(redis, PREFIX, near, **options)
        client = http(app)
        made.append((near, redis, client))
        return Instance(near, app, client)

    yield make
    for near, redis, client in made:
        await client.aclose()
        await near.aclose()
        await redis.aclose()


async def pair(make_instance: object, **options: object) -> tuple[Instance, Instance]:
    a: Instance = make_instance(**options)  # type: ignore[operator]
    b: Instance = make_instance(**options)  # type: ignore[operator]
    return a, b


async def share_session(a: Instance, b: Instance, path: str, body: object = None) -> None:
    """Start a session on A (POST ``path``), give B its cookie, and let B hold it."""
    response = await a.client.post(path, json=body)
    assert response.status_code == 200
    b.client.cookies = a.client.cookies
    await b.client.get("/read")
    await usable(b.near)
    await read_until_local(b.client, b.near)


async def session_key(raw: Redis) -> bytes:
    keys = [k async for k in raw.scan_iter(match=f"{PREFIX}*") if b":u:" not in k]
    assert len(keys) == 1, keys
    key: bytes = keys[0]
    return key


@pytest.mark.parametrize("change", ["write", "clear", "incr", "regenerate"])
async def test_a_request_on_a_ends_the_copy_on_b(make_instance: object, change: str) -> None:
    a, b = await pair(make_instance)
    await share_session(a, b, "/set", {"x": 1})
    assert (await b.client.get("/read")).json() == {"x": 1}
    if change == "write":
        await a.client.post("/set", json={"x": 2})
        expected: object = {"x": 2}
    elif change == "incr":
        await a.client.post("/incr/n")
        expected = {"x": 1, "n": 1}
    elif change == "regenerate":
        # A login rotates the id: B still presents the old one, now deleted.
        await a.client.post("/login/alice")
        expected = {}
    else:
        await a.client.post("/logout")
        expected = {}
    await until_page(b.client, "/read", expected)


async def test_logout_on_a_ends_the_login_on_b(make_instance: object) -> None:
    a, b = await pair(make_instance)
    await share_session(a, b, "/login/alice")
    assert (await b.client.get("/whoami")).json()["user"] == "alice"
    await a.client.post("/logout")
    await until_page(b.client, "/read", {})
    assert (await b.client.get("/whoami")).json()["user"] is None


@pytest.mark.parametrize("how", ["revoke_user", "revoke_session"])
async def test_an_admin_revoke_ends_the_copy(
    make_instance: object, own_redis: RedisProcess, how: str
) -> None:
    a, b = await pair(make_instance)
    await share_session(a, b, "/login/alice")
    handle = (await b.client.get("/whoami")).json()["handle"]
    async with SessionStore(own_redis.url, key_prefix=PREFIX) as admin:
        if how == "revoke_user":
            assert await admin.revoke_user("alice") == 1
        else:
            assert await admin.revoke_session("alice", handle)
    await until_page(b.client, "/read", {})
    await until_page(a.client, "/read", {})


@pytest.mark.parametrize("how", ["DEL", "FLUSHDB", "HSET"])
async def test_a_raw_client_ends_the_copy(make_instance: object, raw: Redis, how: str) -> None:
    a, b = await pair(make_instance)
    await share_session(a, b, "/set", {"x": 1})
    key = await session_key(raw)
    expected: object = {}
    if how == "DEL":
        await raw.delete(key)
    elif how == "FLUSHDB":
        await raw.flushdb()
    else:
        await raw.hset(key, "d:x", b"5")
        expected = {"x": 5}
    await until_page(b.client, "/read", expected)
    await until_page(a.client, "/read", expected)


async def test_a_copy_is_not_served_past_the_redis_ttl(make_instance: object, raw: Redis) -> None:
    # idle_timeout 1.5 s: B holds the copy, then nobody touches the session; at
    # its Redis TTL it is gone, whether or not Redis announced the expiry yet.
    a, b = await pair(make_instance, idle_timeout=1.5)
    await share_session(a, b, "/set", {"x": 1})
    key = await session_key(raw)
    pttl = await raw.pttl(key)
    assert pttl > 0
    # Just past it: before Redis's active expiry (10 Hz) has likely deleted it.
    await asyncio.sleep(pttl / 1000 + 0.01)
    assert (await b.client.get("/read")).json() == {}


async def test_a_copy_is_not_served_past_the_absolute_lifetime(
    make_instance: object, raw: Redis
) -> None:
    # The idle TTL is long, the lifetime short: the copy is kept by the near
    # cache (up to its PTTL) but load() refuses it once the lifetime is over.
    a, b = await pair(make_instance, idle_timeout=60, absolute_lifetime=3.0)
    started = time.monotonic()
    await share_session(a, b, "/set", {"x": 1})
    assert (await b.client.get("/read")).json() == {"x": 1}
    await asyncio.sleep(3.05 - (time.monotonic() - started))
    assert (await b.client.get("/read")).json() == {}


async def test_read_your_writes(make_instance: object) -> None:
    (a,) = [make_instance()]  # type: ignore[operator]
    await a.client.post("/set", json={"x": 0})
    await a.client.get("/read")
    await usable(a.near)
    for i in range(1, 20):
        await read_until_local(a.client, a.near)
        await a.client.post("/set", json={"x": i})
        assert (await a.client.get("/read")).json()["x"] == i
        assert (await a.client.post("/incr/n")).text == str(i)
        assert (await a.client.get("/read")).json() == {"x": i, "n": i}


async def test_a_load_overtaken_by_a_write_is_not_kept(
    make_instance: object, own_redis: RedisProcess
) -> None:
    """B's LOAD reply is held by a proxy while A writes; the invalidation reaches
    B's tracker (no longer delayed) before the old reply: B must not keep it."""
    async with DelayProxy(own_redis.port) as proxy:
        a: Instance = make_instance()  # type: ignore[operator]
        near_b = NearCache(heartbeat=30, heartbeat_timeout=5)  # no PING to delay
        redis_b = Redis.from_url(proxy.url, socket_timeout=5)
        b = session_app(redis_b, PREFIX, near_b)
        try:
            async with http(b) as client_b:
                await store_of(b).load("nosuch")  # starts B's tracker
                await usable(near_b)
                invalidations = near_b.stats.invalidations
                await a.client.post("/set", json={"x": 1})
                await until(lambda: near_b.stats.invalidations > invalidations, 5)
                client_b.cookies = a.client.cookies
                proxy.latency = 0.5
                replies = proxy.chunks["replies"]
                held = asyncio.ensure_future(client_b.get("/read"))
                await proxy.until_chunks("replies", replies + 1)  # LOAD ran in Redis
                proxy.latency = 0.0
                invalidations = near_b.stats.invalidations
                refused = near_b.stats.refused
                await a.client.post("/set", json={"x": 2})
                await until(lambda: near_b.stats.invalidations > invalidations, 5)
                assert not held.done()  # the invalidation came first
                assert (await held).json() == {"x": 1}  # read before the write: fine
                assert near_b.stats.refused == refused + 1
                assert (await client_b.get("/read")).json() == {"x": 2}
        finally:
            await near_b.aclose()
            await redis_b.aclose()


async def test_a_write_that_raised_still_drops_the_copy(own_redis: RedisProcess) -> None:
    """A save whose reply comes too late is a 503, yet it ran in Redis: the next
    request must not be served the copy from before it -- while the tracker's
    invalidation is still held back by the proxy."""
    async with DelayProxy(own_redis.port) as proxy:
        near = NearCache(heartbeat=30, heartbeat_timeout=5)
        redis = Redis.from_url(proxy.url, socket_timeout=5)
        app = session_app(redis, PREFIX, near, timeout=0.3)
        try:
            async with http(app) as client:
                await client.post("/set", json={"x": 1})
                await client.get("/read")
                await usable(near)
                assert await read_until_local(client, near) == {"x": 1}
                proxy.latency = 1.0
                assert (await client.post("/set", json={"x": 2})).status_code == 503
                proxy.latency = 0.0
                invalidations = near.stats.invalidations
                assert (await client.get("/read")).json() == {"x": 2}
                # Ours, not the tracker's, dropped it: that one is still in the proxy.
                assert near.stats.invalidations == invalidations
        finally:
            await near.aclose()
            await redis.aclose()
