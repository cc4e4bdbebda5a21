"""A leader whose response will not be stored lets its waiters go at once.

Requests that miss a key while another one fills it wait (up to ``lock_wait``)
for its entry. When the leader's response turns out not storable (streamed,
Set-Cookie, no-store, too big, an error status) there will be no entry: the
waiters in this process and the pollers in others (through the Redis lease)
must run the handler themselves right away, not after ``lock_wait``.

Each handler here blocks until every request has entered it: with waiters
held back only the leader ever enters, and the test times out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_redis_kit import Cache, CacheMiddleware, cached
from tests.cache.conftest import Framework, client_for
from tests.support import free_port

pytestmark = pytest.mark.real_redis

N = 6
# Far longer than the test's bound: a waiter that waits it out fails the test.
LOCK_WAIT = 30
BOUND = 10


class Gate:
    """Counts handler runs; opens once ``expected`` requests have entered."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.entered = 0
        self.all_in = asyncio.Event()

    def enter(self) -> None:
        self.entered += 1
        if self.entered >= self.expected:
            self.all_in.set()


def _app(framework: Framework, cache: Cache, gate: Gate) -> ASGIApp:
    async def after_first_chunk() -> AsyncIterator[bytes]:
        yield b"first "
        await gate.all_in.wait()
        yield b"last"

    async def before_first_chunk() -> AsyncIterator[bytes]:
        await gate.all_in.wait()
        yield b"body"

    def lingering(response: Response) -> Response:
        # Body sent, then the app keeps running (a background task) until all entered.
        response.background = BackgroundTask(gate.all_in.wait)
        return response

    @cached(ttl=60)
    async def stream(request: Request) -> Response:
        gate.enter()
        return StreamingResponse(after_first_chunk())

    @cached(ttl=60)
    async def cookie(request: Request) -> Response:
        gate.enter()
        return StreamingResponse(before_first_chunk(), headers={"set-cookie": "a=b"})

    @cached(ttl=60)
    async def no_store(request: Request) -> Response:
        gate.enter()
        return lingering(PlainTextResponse("body", headers={"cache-control": "no-store"}))

    @cached(ttl=60, max_size=10)
    async def big(request: Request) -> Response:
        gate.enter()
        return lingering(PlainTextResponse("x" * 100))

    @cached(ttl=60)
    async def error(request: Request) -> Response:
        gate.enter()
        return lingering(PlainTextResponse("body", status_code=503))

    endpoints = {"stream": stream, "cookie": cookie, "no-store": no_store, "big": big}
    endpoints["error"] = error
    middleware = [Middleware(CacheMiddleware, cache=cache)]
    if framework == "starlette":
        return Starlette(
            routes=[Route(f"/{name}", endpoint) for name, endpoint in endpoints.items()],
            middleware=middleware,
        )
    app = FastAPI(middleware=middleware)
    for name, endpoint in endpoints.items():
        app.add_api_route(f"/{name}", endpoint)
    return app


ROUTES = ["stream", "cookie", "no-store", "big", "error"]


async def _all_ran(clients: list[httpx.AsyncClient], path: str, gate: Gate) -> None:
    async with asyncio.timeout(BOUND):
        responses = await asyncio.gather(
            *(clients[n % len(clients)].get(path) for n in range(gate.expected))
        )
    assert gate.entered == gate.expected
    assert {r.headers["x-cache"] for r in responses} <= {"MISS", "BYPASS"}
    assert len({r.status_code for r in responses}) == 1


@pytest.mark.parametrize("route", ROUTES)
async def test_waiters_in_this_process_go_as_soon_as_the_leader_cannot_store(
    framework: Framework, real_redis: Redis, key_prefix: str, route: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix, lock_wait=LOCK_WAIT, timeout=5)
    gate = Gate(N)
    async with client_for(_app(framework, cache, gate)) as client:
        await _all_ran([client], f"/{route}", gate)
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:l:*")] == []
    await cache.aclose()


@pytest.mark.parametrize("route", ["stream", "cookie"])
async def test_another_process_stops_polling_the_lease_at_once(
    framework: Framework, redis_url: str, key_prefix: str, route: str
) -> None:
    """Two processes: the second finds the first one's lease and polls it; the
    lease is released as soon as the first knows it will not store."""
    caches = [
        Cache(redis_url, key_prefix=key_prefix, lock_wait=LOCK_WAIT, timeout=5) for _ in range(2)
    ]
    gate = Gate(2)
    clients = [client_for(_app(framework, cache, gate)) for cache in caches]
    try:
        await _all_ran(clients, f"/{route}", gate)
    finally:
        for client, cache in zip(clients, caches, strict=True):
            await client.aclose()
            await cache.aclose()


@pytest.mark.parametrize("route", ["stream", "cookie", "big"])
async def test_without_redis_waiters_go_as_soon_as_the_answer_cannot_be_shared(
    framework: Framework, key_prefix: str, route: str
) -> None:
    """Redis is down: requests for one key still wait for one handler run, to
    share its answer; one that cannot be shared must not hold them."""
    cache = Cache(f"redis://127.0.0.1:{free_port()}", key_prefix=key_prefix, lock_wait=LOCK_WAIT)
    gate = Gate(N)
    async with client_for(_app(framework, cache, gate)) as client:
        await _all_ran([client], f"/{route}", gate)
    await cache.aclose()
