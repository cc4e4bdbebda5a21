"""A small app with the response cache, sessions and a Metrics hub, on real Redis."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from asgi_redis_kit import CacheMiddleware, Metrics, Session, SessionMiddleware, cached, get_cache

SECRET = "m" * 32


@cached(ttl=60)
async def page(request: Request) -> Response:
    return PlainTextResponse("page")


@cached(ttl=60)
async def private(request: Request) -> Response:
    return PlainTextResponse("private", headers={"cache-control": "private"})


async def write(request: Request) -> Response:
    request.session["n"] = int(request.query_params.get("n", "1"))
    return PlainTextResponse("written")


async def read(request: Request) -> Response:
    return PlainTextResponse(str(request.session.get("n")))


async def login(request: Request) -> Response:
    session = Session.of(request)
    session.regenerate()
    session.bind_user(request.query_params["user"])
    return PlainTextResponse("welcome")


async def logout(request: Request) -> Response:
    request.session.clear()
    return PlainTextResponse("bye")


async def invalidate(request: Request) -> Response:
    await get_cache(request).invalidate_tags("a", "b")
    return PlainTextResponse("done")


def build(
    *, redis: str, key_prefix: str, metrics: Metrics, session_redis: str | None = None, **cache: Any
) -> Starlette:
    """``/page`` (cached), ``/private`` (cached route, never stored), ``/write``,
    ``/read``, ``/login?user=``, ``/logout``, ``/invalidate`` and ``/metrics``."""
    return Starlette(
        routes=[
            Route("/page", page),
            Route("/private", private),
            Route("/write", write),
            Route("/read", read),
            Route("/login", login),
            Route("/logout", logout),
            Route("/invalidate", invalidate),
            Mount("/metrics", metrics.asgi_app()),
        ],
        middleware=[
            Middleware(
                CacheMiddleware, redis=redis, key_prefix=key_prefix + "c:", metrics=metrics, **cache
            ),
            Middleware(
                SessionMiddleware,
                secret_key=SECRET,
                redis=session_redis or redis,
                key_prefix=key_prefix + "s:",
                timeout=0.3,
                metrics=metrics,
            ),
        ],
    )


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
