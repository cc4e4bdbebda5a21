"""Behaviour 6: stale-while-revalidate and stale-if-error (RFC 5861)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Cache, CacheMiddleware, cached
from tests.cache.conftest import Calls, Clock, Framework, Harness, build, client_for


async def test_stale_while_revalidate_serves_at_once_and_refreshes_once(
    harness: Harness,
) -> None:
    assert (await harness.client.get("/stale")).text == "<h1>stale 1</h1>"
    harness.clock.advance(15)  # ttl=10, stale_while_revalidate=30
    harness.calls.gate = asyncio.Event()  # the refresh blocks until we let it go
    responses = await asyncio.gather(*(harness.client.get("/stale") for _ in range(20)))
    assert {r.headers["x-cache"] for r in responses} == {"STALE"}
    assert {r.headers["x-cache-reason"] for r in responses} == {"revalidating"}
    assert {r.text for r in responses} == {"<h1>stale 1</h1>"}  # served without waiting
    harness.calls.gate.set()
    await harness.cache.wait_background()
    assert harness.calls["stale"] == 2  # exactly one background refresh
    assert harness.cache.stats.refreshes == 1
    fresh = await harness.client.get("/stale")
    assert (fresh.headers["x-cache"], fresh.text) == ("HIT", "<h1>stale 2</h1>")


async def test_past_the_revalidate_window_is_a_plain_miss(harness: Harness) -> None:
    await harness.client.get("/stale")
    harness.clock.advance(45)  # beyond ttl + stale_while_revalidate
    response = await harness.client.get("/stale")
    assert (response.headers["x-cache"], response.text) == ("MISS", "<h1>stale 2</h1>")


async def test_stale_if_error_serves_the_old_entry_when_the_handler_raises(
    harness: Harness,
) -> None:
    await harness.client.get("/stale")
    harness.clock.advance(50)  # past stale_while_revalidate, inside stale_if_error=60
    harness.calls.fail = True
    response = await harness.client.get("/stale")
    assert response.status_code == 200
    assert (response.headers["x-cache"], response.headers["x-cache-reason"]) == (
        "STALE",
        "error",
    )
    assert response.text == "<h1>stale 1</h1>"
    harness.clock.advance(30)  # past stale_if_error too: the error shows
    with pytest.raises(RuntimeError, match="handler failed"):
        await harness.client.get("/stale")


async def test_without_a_stale_entry_the_error_propagates(harness: Harness) -> None:
    harness.calls.fail = True
    with pytest.raises(RuntimeError, match="handler failed"):
        await harness.client.get("/stale")


async def test_stale_if_error_covers_5xx_answers(real_redis: Redis, key_prefix: str) -> None:
    clock = Clock()
    failing = False

    @cached(ttl=10, stale_if_error=60)
    async def upstream(request: Request) -> Response:
        if failing:
            return PlainTextResponse("upstream down", status_code=503)
        return PlainTextResponse("good")

    cache = Cache(real_redis, key_prefix=key_prefix, clock=clock)
    app = Starlette(
        routes=[Route("/u", upstream)], middleware=[Middleware(CacheMiddleware, cache=cache)]
    )
    async with client_for(app) as client:
        await client.get("/u")
        clock.advance(20)
        failing = True
        response = await client.get("/u")
        assert (response.status_code, response.text, response.headers["x-cache"]) == (
            200,
            "good",
            "STALE",
        )
        clock.advance(60)
        assert (await client.get("/u")).status_code == 503
    await cache.aclose()


class FlakyRedis(Redis):
    """A real client whose scripts fail on demand: Redis answering the lookup
    and then failing mid-request."""

    failing = False

    async def evalsha(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing:
            raise RedisConnectionError("connection lost mid-request")
        return await super().evalsha(*args, **kwargs)


async def test_stale_if_error_covers_redis_failing_mid_request(
    framework: Framework, redis_url: str, real_redis: Redis, key_prefix: str
) -> None:
    client = FlakyRedis.from_pool(ConnectionPool.from_url(redis_url))
    assert isinstance(client, FlakyRedis)
    clock = Clock()
    cache = Cache(client, key_prefix=key_prefix, clock=clock)
    calls = Calls()
    async with client_for(build(framework, cache, calls)) as http:
        await http.get("/stale")
        clock.advance(50)  # only stale_if_error (60) still covers it
        client.failing = True
        response = await http.get("/stale")
        assert (response.headers["x-cache"], response.headers["x-cache-reason"]) == (
            "STALE",
            "backend",
        )
        assert response.text == "<h1>stale 1</h1>"
    assert calls["stale"] == 1
    await cache.aclose()
    await client.aclose()
