"""An app for the over-the-wire tests, run by real uvicorn processes.

``python -m uvicorn --factory tests.cache.wire_app:create`` with ``REDIS_URL``
and ``KEY_PREFIX`` set. Handler calls are counted in Redis so a test can sum
them across processes. ``/report?burst=N`` holds the handler until N requests
for it have reached the two processes (counted in Redis too), so a burst is
really concurrent however slowly it arrives.
"""

from __future__ import annotations

import os

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_redis_kit import CacheMiddleware, SessionMiddleware, cached, get_cache


def create() -> ASGIApp:
    url = os.environ["REDIS_URL"]
    prefix = os.environ["KEY_PREFIX"]
    # Longer than the burst's wait below (redis-py's default is 5 s, even for BLMOVE).
    counter = Redis.from_url(url, socket_timeout=30)
    arrived, burst_in = f"{prefix}arrived:report", f"{prefix}burst-in:report"

    @cached(ttl=60, tags=["report"], ignores_session=True)
    async def report(request: Request) -> Response:
        await counter.incr(f"{prefix}calls:report")
        if "burst" in request.query_params:
            # Wait for the whole burst; BLMOVE puts the token back for anyone else.
            await counter.blmove(burst_in, burst_in, timeout=20, src="LEFT", dest="LEFT")
        return HTMLResponse(f"<h1>report from {os.getpid()}</h1>")

    async def visits(request: Request) -> Response:
        request.session["visits"] = request.session.get("visits", 0) + 1
        return PlainTextResponse(f"Número de visitas: {request.session['visits']}")

    async def stats(request: Request) -> Response:
        return JSONResponse(get_cache(request).stats.as_dict())

    app = Starlette(
        routes=[Route("/report", report), Route("/", visits), Route("/stats", stats)],
        middleware=[
            Middleware(CacheMiddleware, redis=url, key_prefix=prefix + "c:"),
            Middleware(SessionMiddleware, secret_key="w" * 32, redis=url, key_prefix=prefix + "s:"),
        ],
    )

    async def count_arrivals(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/report":
            burst = QueryParams(scope["query_string"]).get("burst")
            if burst is not None and await counter.incr(arrived) == int(burst):
                await counter.lpush(burst_in, 1)
        await app(scope, receive, send)

    return count_arrivals
