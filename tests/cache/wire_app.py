"""An app for the over-the-wire tests, run by real uvicorn processes.

``python -m uvicorn --factory tests.cache.wire_app:create`` with ``REDIS_URL``
and ``KEY_PREFIX`` set. Handler calls are counted in Redis so a test can sum
them across processes.
"""

from __future__ import annotations

import asyncio
import os

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import CacheMiddleware, SessionMiddleware, cached, get_cache


def create() -> Starlette:
    url = os.environ["REDIS_URL"]
    prefix = os.environ["KEY_PREFIX"]
    counter = Redis.from_url(url)

    @cached(ttl=60, tags=["report"], ignores_session=True)
    async def report(request: Request) -> Response:
        await counter.incr(f"{prefix}calls:report")
        await asyncio.sleep(0.3)  # slow, so the other requests pile up behind it
        return HTMLResponse(f"<h1>report from {os.getpid()}</h1>")

    async def visits(request: Request) -> Response:
        request.session["visits"] = request.session.get("visits", 0) + 1
        return PlainTextResponse(f"Número de visitas: {request.session['visits']}")

    async def stats(request: Request) -> Response:
        return JSONResponse(get_cache(request).stats.as_dict())

    return Starlette(
        routes=[Route("/report", report), Route("/", visits), Route("/stats", stats)],
        middleware=[
            Middleware(CacheMiddleware, redis=url, key_prefix=prefix + "c:"),
            Middleware(SessionMiddleware, secret_key="w" * 32, redis=url, key_prefix=prefix + "s:"),
        ],
    )
