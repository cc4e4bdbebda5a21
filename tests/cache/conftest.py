"""Apps for the cache tests: the same routes as a Starlette app and a FastAPI app.

Every route counts its calls in ``Calls`` so tests assert hits and misses from
what the handler saw, not from our own headers alone. ``FakeSession`` mimics
the session contract the cache relies on (``scope["session"]``, ``Vary: Cookie``
when read) without importing session internals.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_redis_kit import Cache, CacheMiddleware, cached, get_cache

Framework = Literal["starlette", "fastapi"]


class Clock:
    """Wall clock for entry freshness that tests move by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Calls:
    counts: Counter[str] = field(default_factory=Counter)
    fail: bool = False
    gate: asyncio.Event | None = None
    # Set whenever a handler starts, so tests can wait for it without polling.
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    def __getitem__(self, name: str) -> int:
        return self.counts[name]


class FakeSession:
    """Mimics SessionMiddleware's contract: ``scope["session"]`` is a mapping
    holding the cookie's value as "user", and reading it adds ``Vary: Cookie``."""

    def __init__(self, app: ASGIApp, cookie_name: str = "session") -> None:
        self.app = app
        self.cookie_name = cookie_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        read: list[bool] = []
        cookie = Request(scope).cookies.get(self.cookie_name)
        data = {"user": cookie} if cookie else {}

        class Tracking(dict[str, Any]):
            def __getitem__(self, key: str) -> Any:
                read.append(True)
                return super().__getitem__(key)

            def get(self, key: str, default: Any = None) -> Any:
                read.append(True)
                return super().get(key, default)

        scope["session"] = Tracking(data)

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start" and read:
                MutableHeaders(scope=message).add_vary_header("Cookie")
            await send(message)

        await self.app(scope, receive, wrapped)


class Item(BaseModel):
    id: int
    name: str


# Handlers that behave the same in both frameworks, written once.
async def _page(calls: Calls, name: str) -> str:
    calls.counts[name] += 1
    calls.entered.set()
    if calls.gate is not None:
        await calls.gate.wait()
    if calls.fail:
        raise RuntimeError("handler failed")
    return f"<h1>{name} {calls.counts[name]}</h1>"


def _echo(calls: Calls, request: Request) -> Response:
    """Status and headers from the query, so each policy case is one URL."""
    calls.counts["echo"] += 1
    status = int(request.query_params.get("status", "200"))
    response = PlainTextResponse(f"echo {calls.counts['echo']}", status_code=status)
    for item in request.query_params.getlist("h"):
        name, _, value = item.partition(":")
        response.headers.append(name, value)
    return response


async def _user(calls: Calls, request: Request, name: str) -> str:
    calls.counts[name] += 1
    calls.entered.set()
    if calls.gate is not None:
        await calls.gate.wait()
    session = request.scope["session"]
    if request.cookies.get("session"):
        return f"user {session.get('user')} call {calls.counts[name]}"
    return f"anonymous call {calls.counts[name]}"


async def _stream() -> AsyncIterator[bytes]:
    for part in (b"one ", b"two ", b"three"):
        yield part


def starlette_app(calls: Calls, middleware: list[Middleware]) -> Starlette:
    @cached(ttl=60)
    async def page(request: Request) -> Response:
        return HTMLResponse(await _page(calls, "page"))

    @cached(ttl=60, ignores_session=True)
    async def shared(request: Request) -> Response:
        return HTMLResponse(await _page(calls, "shared"))

    @cached(ttl=60, tags=["item:{item_id}", "items"])
    async def item(request: Request) -> Response:
        calls.counts["item"] += 1
        item_id = request.path_params["item_id"]
        return JSONResponse(
            {"id": item_id, "q": request.query_params.get("q"), "n": calls.counts["item"]}
        )

    @cached(ttl=60, tags=["report"])
    async def echo(request: Request) -> Response:
        return _echo(calls, request)

    @cached(ttl=60, vary=["accept-language"])
    async def lang(request: Request) -> Response:
        calls.counts["lang"] += 1
        value = request.headers.get("accept-language", "none")
        return PlainTextResponse(f"lang {value}", headers={"vary": "Accept-Language"})

    @cached(ttl=60)
    async def whoami(request: Request) -> Response:
        return PlainTextResponse(await _user(calls, request, "whoami"))

    @cached(ttl=60, vary_on_session=True)
    async def mine(request: Request) -> Response:
        return PlainTextResponse(await _user(calls, request, "mine"))

    @cached(ttl=60)
    async def stream(request: Request) -> Response:
        calls.counts["stream"] += 1
        return StreamingResponse(_stream())

    @cached(ttl=60, max_size=100)
    async def big(request: Request) -> Response:
        calls.counts["big"] += 1
        return Response(b"x" * 1000, media_type="application/octet-stream")

    @cached(ttl=10, stale_while_revalidate=30, stale_if_error=60)
    async def stale(request: Request) -> Response:
        return HTMLResponse(await _page(calls, "stale"))

    @cached(ttl=60)
    async def forwarded(request: Request) -> Response:
        calls.counts["forwarded"] += 1
        host = request.headers.get("x-forwarded-host", request.url.hostname)
        return HTMLResponse(f'<a href="https://{host}/next">next</a>')

    @cached(ttl=60, public=True)
    async def public(request: Request) -> Response:
        calls.counts["public"] += 1
        return PlainTextResponse(f"public {calls.counts['public']}")

    @cached(ttl=60)
    async def account(request: Request) -> Response:
        calls.counts["account"] += 1
        return PlainTextResponse(f"account {calls.counts['account']}")

    async def plain(request: Request) -> Response:
        calls.counts["plain"] += 1
        return PlainTextResponse("plain")

    @cached(ttl=60)
    async def admin_invalidate(request: Request) -> Response:
        return PlainTextResponse("never cached")

    async def invalidate(request: Request) -> Response:
        n = await get_cache(request).invalidate_tags("report")
        return PlainTextResponse(f"invalidated {n}")

    sub = Starlette(routes=[Route("/page", page)])
    return Starlette(
        routes=[
            Route("/page", page, methods=["GET", "POST"]),
            Route("/shared", shared),
            Route("/items/{item_id:int}", item),
            Route("/echo", echo),
            Route("/lang", lang),
            Route("/whoami", whoami),
            Route("/mine", mine),
            Route("/stream", stream),
            Route("/big", big),
            Route("/stale", stale),
            Route("/forwarded", forwarded),
            Route("/public", public),
            Route("/account", account),
            Route("/plain", plain),
            Route("/invalidate", invalidate, methods=["POST"]),
            Mount("/sub", app=sub),
        ],
        middleware=middleware,
    )


def fastapi_app(calls: Calls, middleware: list[Middleware]) -> FastAPI:
    app = FastAPI(middleware=middleware)

    def dependency() -> str:
        calls.counts["dependency"] += 1
        return "dep"

    @app.api_route("/page", methods=["GET", "POST"], response_class=HTMLResponse)
    @cached(ttl=60)
    async def page(dep: str = Depends(dependency)) -> str:
        return await _page(calls, "page")

    @app.get("/shared", response_class=HTMLResponse)
    @cached(ttl=60, ignores_session=True)
    async def shared() -> str:
        return await _page(calls, "shared")

    @app.get("/items/{item_id}", response_model=Item)
    @cached(ttl=60, tags=["item:{item_id}", "items"])
    def item(item_id: int, q: str | None = None) -> Any:
        # Sync on purpose: FastAPI runs it in its thread pool. The extra field
        # "secret" must be filtered out by response_model, on hits too.
        calls.counts["item"] += 1
        if item_id == 404:
            raise HTTPException(404, "no such item")
        return {"id": item_id, "name": f"q={q} n={calls.counts['item']}", "secret": "s3cret"}

    @app.get("/echo")
    @cached(ttl=60, tags=["report"])
    async def echo(request: Request) -> Response:
        return _echo(calls, request)

    @app.get("/lang")
    @cached(ttl=60, vary=["accept-language"])
    async def lang(request: Request) -> Response:
        calls.counts["lang"] += 1
        value = request.headers.get("accept-language", "none")
        return PlainTextResponse(f"lang {value}", headers={"vary": "Accept-Language"})

    @app.get("/whoami", response_class=PlainTextResponse)
    @cached(ttl=60)
    async def whoami(request: Request) -> str:
        return await _user(calls, request, "whoami")

    @app.get("/mine", response_class=PlainTextResponse)
    @cached(ttl=60, vary_on_session=True)
    async def mine(request: Request) -> str:
        return await _user(calls, request, "mine")

    @app.get("/stream")
    @cached(ttl=60)
    async def stream() -> StreamingResponse:
        calls.counts["stream"] += 1
        return StreamingResponse(_stream())

    @app.get("/big")
    @cached(ttl=60, max_size=100)
    async def big() -> Response:
        calls.counts["big"] += 1
        return Response(b"x" * 1000, media_type="application/octet-stream")

    @app.get("/stale", response_class=HTMLResponse)
    @cached(ttl=10, stale_while_revalidate=30, stale_if_error=60)
    async def stale() -> str:
        return await _page(calls, "stale")

    @app.get("/forwarded", response_class=HTMLResponse)
    @cached(ttl=60)
    async def forwarded(request: Request) -> str:
        calls.counts["forwarded"] += 1
        host = request.headers.get("x-forwarded-host", request.url.hostname)
        return f'<a href="https://{host}/next">next</a>'

    @app.get("/public", response_class=PlainTextResponse)
    @cached(ttl=60, public=True)
    def public() -> str:
        calls.counts["public"] += 1
        return f"public {calls.counts['public']}"

    @app.get("/account", response_class=PlainTextResponse)
    @cached(ttl=60)
    async def account() -> str:
        calls.counts["account"] += 1
        return f"account {calls.counts['account']}"

    @app.get("/plain", response_class=PlainTextResponse)
    async def plain() -> str:
        calls.counts["plain"] += 1
        return "plain"

    @app.post("/invalidate", response_class=PlainTextResponse)
    async def invalidate(request: Request) -> str:
        n = await get_cache(request).invalidate_tags("report")
        return f"invalidated {n}"

    sub = FastAPI()
    sub.get("/page", response_class=HTMLResponse)(cached(ttl=60)(page))
    app.mount("/sub", sub)
    return app


AppFactory = Callable[..., Awaitable["Harness"]]


@dataclass
class Harness:
    app: ASGIApp
    cache: Cache
    calls: Calls
    client: httpx.AsyncClient
    clock: Clock


@pytest.fixture(params=["starlette", "fastapi"])
def framework(request: pytest.FixtureRequest) -> Framework:
    value: Framework = request.param
    return value


def build(
    framework: Framework,
    cache: Cache,
    calls: Calls,
    *,
    session: bool = True,
    extra: list[Middleware] | None = None,
) -> ASGIApp:
    middleware = [Middleware(CacheMiddleware, cache=cache)]
    if session:
        middleware.append(Middleware(FakeSession))
    middleware += extra or []
    if framework == "starlette":
        return starlette_app(calls, middleware)
    return fastapi_app(calls, middleware)


def client_for(app: ASGIApp, host: str = "testserver") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=f"http://{host}", timeout=30
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def harness(
    framework: Framework, real_redis: Redis, key_prefix: str, clock: Clock
) -> AsyncIterator[Harness]:
    """A Starlette or FastAPI app with CacheMiddleware on the real Redis (counted
    by ``spy``) and FakeSession inside it.

    Its deadline is generous: a call that misses the default 0.5 s fails open (an
    uncached BYPASS), and a burst of 200 requests on one event loop can delay a
    reply that long on a loaded machine. Tests of the deadline make caches of
    their own."""
    cache = Cache(real_redis, key_prefix=key_prefix, clock=clock, timeout=5)
    calls = Calls()
    app = build(framework, cache, calls)
    async with client_for(app) as client:
        yield Harness(app, cache, calls, client, clock)
    await cache.aclose()


@pytest.fixture
async def make_cache(key_prefix: str) -> AsyncIterator[Callable[..., Cache]]:
    """Caches on this test's key prefix, closed on teardown."""
    made: list[Cache] = []

    def make(redis: Any, **options: Any) -> Cache:
        options.setdefault("key_prefix", key_prefix)
        cache = Cache(redis, **options)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()
