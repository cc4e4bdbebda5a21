"""Helpers for the near-cache tests of the response cache: a small app whose
routes count their calls, and a wait for a Cache's near view to be usable."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_redis_kit import Cache, CacheMiddleware, cached
from asgi_redis_kit.cache._near_layer import NearLayer
from tests.near.conftest import until
from tests.support import RedisSpy


def make_app(cache: Cache, calls: Counter[str]) -> ASGIApp:
    """``/page`` (60 s, tag ``page``), ``/short`` (1 s), ``/stale`` (1 s fresh,
    30 s stale-while-revalidate), ``/flaky`` (1 s fresh, 30 s stale-if-error;
    fails while ``calls["fail"]``); each body names its call count."""

    def counted(name: str) -> PlainTextResponse:
        calls[name] += 1
        return PlainTextResponse(f"{name} {calls[name]}")

    @cached(ttl=60, tags=["page"])
    async def page(request: Request) -> Response:
        return counted("page")

    @cached(ttl=1)
    async def short(request: Request) -> Response:
        return counted("short")

    @cached(ttl=1, stale_while_revalidate=30)
    async def stale(request: Request) -> Response:
        return counted("stale")

    @cached(ttl=1, stale_if_error=30)
    async def flaky(request: Request) -> Response:
        if calls["fail"]:
            raise RuntimeError("the handler fails")
        return counted("flaky")

    return Starlette(
        routes=[
            Route("/page", page, methods=["GET", "HEAD"]),
            Route("/short", short),
            Route("/stale", stale),
            Route("/flaky", flaky),
        ],
        middleware=[Middleware(CacheMiddleware, cache=cache)],
    )


def http(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver",
        timeout=30,
    )


def layer(cache: Cache) -> NearLayer:
    assert isinstance(cache.storage, NearLayer), cache.storage
    return cache.storage


async def near_ready(cache: Cache, within: float = 10.0) -> None:
    """Wait until the cache's near view (of this loop's client) is usable."""
    view = layer(cache).view()
    await until(lambda: view.usable, within)


async def body(client: httpx.AsyncClient, path: str) -> str:
    response = await client.get(path)
    assert response.status_code == 200, response
    return response.text


async def warm(client: httpx.AsyncClient, spy: RedisSpy, path: str) -> None:
    """GET ``path`` until a request sends no Redis command: its keys are kept.

    A read is refused (not kept) when an invalidation of one of its keys comes
    in while it is in flight, including the one Redis sends for the store just
    before it (Redis cannot say which write an invalidation is for), so the
    copy may take a few reads; each refused read is one such race."""
    for _ in range(50):
        spy.reset()
        response = await client.get(path)
        assert response.status_code == 200, response
        if spy.total == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} was never served from the near cache")
