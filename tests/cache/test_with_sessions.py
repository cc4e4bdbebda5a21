"""The cache with the REAL SessionMiddleware on a real Redis: no private page
reaches another client, whatever the middleware order, cookie name or cookie
tricks (checklist 13 and 22 together)."""

from __future__ import annotations

from typing import Any, Literal

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import CacheMiddleware, Session, SessionMiddleware, cached
from tests.cache.conftest import Framework, client_for

SECRET = "k" * 32
Order = Literal["cache-outside", "session-outside"]


async def _login(request: Request) -> Response:
    session = Session.of(request)
    session.regenerate()
    session["user"] = request.query_params["user"]
    session.bind_user(request.query_params["user"])
    return PlainTextResponse("welcome")


async def _logout(request: Request) -> Response:
    request.session.clear()
    return PlainTextResponse("bye")


def _page(request: Request) -> str:
    return f"private page of {request.session.get('user', 'anonymous')}"


def session_app(
    framework: Framework,
    *,
    cache: dict[str, Any],
    session: dict[str, Any],
    order: Order = "cache-outside",
) -> Any:
    """``/login?user=``, ``/logout``, ``/me`` (``vary_on_session``) and ``/whoami``
    (reads the session, shared route) behind both middlewares in ``order``."""
    session_options = {"secret_key": SECRET, **session}
    if framework == "starlette":

        @cached(ttl=60, vary_on_session=True)
        async def me(request: Request) -> Response:
            return PlainTextResponse(_page(request))

        @cached(ttl=60)
        async def whoami(request: Request) -> Response:
            return PlainTextResponse(_page(request))

        layers = [
            Middleware(CacheMiddleware, **cache),
            Middleware(SessionMiddleware, **session_options),
        ]
        return Starlette(
            routes=[
                Route("/login", _login),
                Route("/logout", _logout),
                Route("/me", me),
                Route("/whoami", whoami),
            ],
            middleware=layers if order == "cache-outside" else layers[::-1],
        )
    app = FastAPI()
    app.get("/login")(_login)
    app.get("/logout")(_logout)

    @app.get("/me", response_class=PlainTextResponse)
    @cached(ttl=60, vary_on_session=True)
    async def fastapi_me(request: Request) -> str:
        return _page(request)

    @app.get("/whoami", response_class=PlainTextResponse)
    @cached(ttl=60)
    async def fastapi_whoami(request: Request) -> str:
        return _page(request)

    # add_middleware: the one added last runs first (outermost).
    if order == "cache-outside":
        app.add_middleware(SessionMiddleware, **session_options)
        app.add_middleware(CacheMiddleware, **cache)
    else:
        app.add_middleware(CacheMiddleware, **cache)
        app.add_middleware(SessionMiddleware, **session_options)
    return app


@pytest.fixture
def options(real_redis: Redis, key_prefix: str) -> dict[str, dict[str, Any]]:
    """Both middlewares on the test's Redis client, each with its own prefix."""
    return {
        "cache": {"redis": real_redis, "key_prefix": key_prefix + "c:"},
        "session": {"redis": real_redis, "key_prefix": key_prefix + "s:"},
    }


async def log_in(client: httpx.AsyncClient, user: str) -> str:
    """Log ``client`` in as ``user`` (its cookie jar keeps the session); the raw
    ``name=value`` of its session cookie."""
    response = await client.get(f"/login?user={user}")
    assert response.status_code == 200
    (name, value), *_ = client.cookies.items()
    return f"{name}={value}"


async def test_duplicate_session_cookies_bypass_the_cache(
    framework: Framework, options: dict[str, dict[str, Any]]
) -> None:
    """The session middleware uses the first value that verifies; Starlette's
    cookie parser (and the key) the last one. A request that names the session
    cookie twice is neither served from nor stored in the cache, so a victim
    tricked into sending ``session=<valid>; session=attacker`` never stores its
    page where ``session=attacker`` finds it."""
    app = session_app(framework, cache=options["cache"], session=options["session"])
    async with client_for(app) as victim, client_for(app) as bare:
        cookie = await log_in(victim, "victim")
        twice = f"{cookie}; session=attacker"
        for headers in (
            {"cookie": twice},
            # The same trick spread over two Cookie headers.
            [("cookie", cookie), ("cookie", "session=attacker")],
        ):
            victim.cookies.clear()
            for _ in range(2):
                sent = await victim.get("/me", headers=headers)
                assert sent.text == "private page of victim"
                assert (sent.headers["x-cache"], sent.headers["x-cache-reason"]) == (
                    "BYPASS",
                    "cookie",
                )
            attacker = await bare.get("/me", headers={"cookie": "session=attacker"})
            assert attacker.text == "private page of anonymous"
