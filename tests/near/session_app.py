"""An app with sessions on a near cache, and what the session near-cache tests
share: request-path command counts, polling a page until it shows a value."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Session, SessionMiddleware, SessionStore
from asgi_redis_kit.near import NearCache
from tests.support import RedisSpy

SECRET = "near-session-secret"
# What a tracker sends on its own connection (made from the client's connection
# class, so a RedisSpy counts it too); never a request's command.
TRACKER_COMMANDS = {"PING", "CLIENT", "SUBSCRIBE", "ROLE", "HELLO"}
# A heartbeat timeout that a busy test machine does not reach: these tests are
# about invalidation, not about noticing a silent server.
SLACK_TIMEOUT = 2.0


def session_app(redis: Redis, key_prefix: str, near: NearCache | bool, **options: Any) -> Starlette:
    store = SessionStore(redis, key_prefix=key_prefix, near_cache=near, **options)

    async def read(request: Request) -> Response:
        return JSONResponse(dict(request.session))

    async def set_values(request: Request) -> Response:
        request.session.update(await request.json())
        return PlainTextResponse("ok")

    async def incr(request: Request) -> Response:
        return PlainTextResponse(str(await Session.of(request).incr(request.path_params["key"])))

    async def login(request: Request) -> Response:
        session = Session.of(request)
        session.regenerate()
        session.bind_user(request.path_params["user"])
        session["user"] = request.path_params["user"]
        return PlainTextResponse("logged in")

    async def logout(request: Request) -> Response:
        request.session.clear()
        return PlainTextResponse("logged out")

    async def whoami(request: Request) -> Response:
        session = Session.of(request)
        return JSONResponse({"user": session.user_id, "handle": session.handle})

    routes = [
        Route("/read", read),
        Route("/set", set_values, methods=["POST"]),
        Route("/incr/{key}", incr, methods=["POST"]),
        Route("/login/{user}", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/whoami", whoami),
    ]
    middleware = [Middleware(SessionMiddleware, secret_key=SECRET, store=store)]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.store = store
    return app


def store_of(app: Starlette) -> SessionStore:
    store: SessionStore = app.state.store
    return store


def http(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app, raise_app_exceptions=False),
        base_url="http://testserver",
    )


def request_commands(spy: RedisSpy) -> dict[str, int]:
    """The commands ``spy`` counted, without the trackers' own."""
    return {name: n for name, n in spy.commands.items() if name not in TRACKER_COMMANDS}


async def usable(near: NearCache, within: float = 10.0) -> None:
    """Wait until every tracker of ``near`` has confirmed tracking."""
    deadline = time.monotonic() + within
    while not (near.stats.tracking and all(s == "tracking" for s in near.stats.tracking.values())):
        assert time.monotonic() < deadline, f"not tracking within {within} s"
        await asyncio.sleep(0.01)


async def read_until_local(client: httpx.AsyncClient, near: NearCache) -> Any:
    """GET /read until it was answered from the near cache; returns the page.

    A read is refused when an invalidation arrives while it is in flight -- also
    the one of this test's own setup write -- so the copy may take a few reads."""
    for _ in range(200):
        hits = near.stats.hits
        response = await client.get("/read")
        assert response.status_code == 200
        if near.stats.hits > hits:
            return response.json()
        await asyncio.sleep(0.01)
    raise AssertionError(f"the session was never served from the near cache: {near.stats}")


async def until_page(
    client: httpx.AsyncClient, path: str, expected: Any, within: float = 2.0
) -> None:
    """GET ``path`` until it shows ``expected``; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        response = await client.get(path)
        if response.json() == expected:
            return
        assert time.monotonic() < deadline, f"{path} still shows {response.json()!r}"
        await asyncio.sleep(0.02)
