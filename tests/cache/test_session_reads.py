"""Whatever path a handler takes to the session, its page is never shared
(checklist 42; review finding 2).

Auth, CSRF and admin libraries read ``scope["session"]`` directly; C code such
as ``orjson.dumps`` reads a dict subclass without calling any method we could
hook. So a session holding data counts as read, by design, unless the route
says ``ignores_session=True``. Each case: Alice and Bob log in, Alice asks the
cached page first, and Bob must get his own page - in both middleware orders,
with our SessionMiddleware and with Starlette's cookie sessions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import orjson
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware as CookieSessions
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import CacheMiddleware, SessionMiddleware, cached
from tests.cache.conftest import client_for

SECRET = "k" * 32

READS: dict[str, Callable[[Any], str]] = {
    "scope-get": lambda s: str(s.get("user")),
    "scope-getitem": lambda s: str(s["user"]),
    "dict-method-get": lambda s: str(dict.get(s, "user")),
    "dict-getitem": lambda s: str(dict.__getitem__(s, "user")),
    "dict()": lambda s: str(dict(s)),
    "unpacking": lambda s: str({**s}),
    "iteration": lambda s: ",".join(f"{k}={s[k]}" for k in s),
    "items": lambda s: str(list(s.items())),
    "values": lambda s: str(list(s.values())),
    "copy": lambda s: str(s.copy()),
    "json.dumps": lambda s: json.dumps(s),
    "orjson.dumps": lambda s: orjson.dumps(s).decode(),
    "repr": lambda s: repr(dict(s)),
    "contains": lambda s: str("user" in s) + str(len(s)) + next(iter(dict.values(s))),
}

Stack = Literal["ours-outside", "ours-inside", "starlette-outside", "starlette-inside"]


def _app(stack: Stack, read: Callable[[Any], str], redis: Redis, key_prefix: str) -> Starlette:
    async def login(request: Request) -> Response:
        request.session["user"] = request.query_params["user"]
        return PlainTextResponse("welcome")

    @cached(ttl=60)
    async def page(request: Request) -> Response:
        # Never request.session: straight to the scope, as third-party code does.
        return PlainTextResponse(f"page of {read(request.scope['session'])}")

    sessions = (
        Middleware(SessionMiddleware, secret_key=SECRET, redis=redis, key_prefix=key_prefix + "s:")
        if stack.startswith("ours")
        else Middleware(CookieSessions, secret_key=SECRET)
    )
    cache = Middleware(CacheMiddleware, redis=redis, key_prefix=key_prefix + "c:")
    return Starlette(
        routes=[Route("/login", login), Route("/page", page)],
        middleware=[cache, sessions] if stack.endswith("inside") else [sessions, cache],
    )


@pytest.mark.parametrize(
    "stack", ["ours-outside", "ours-inside", "starlette-outside", "starlette-inside"]
)
@pytest.mark.parametrize("path", sorted(READS))
async def test_a_session_read_by_any_path_is_never_shared(
    stack: Stack, path: str, real_redis: Redis, key_prefix: str
) -> None:
    app = _app(stack, READS[path], real_redis, key_prefix)
    async with client_for(app) as alice, client_for(app) as bob:
        for client, user in ((alice, "alice"), (bob, "bob")):
            assert (await client.get(f"/login?user={user}")).status_code == 200
        for _ in range(2):
            assert "alice" in (await alice.get("/page")).text
        page = await bob.get("/page")
        assert "bob" in page.text
        assert "alice" not in page.text


@pytest.mark.parametrize(
    "stack", ["ours-outside", "ours-inside", "starlette-outside", "starlette-inside"]
)
async def test_an_empty_session_has_nothing_to_give_away_and_is_shared(
    stack: Stack, real_redis: Redis, key_prefix: str
) -> None:
    """Visitors without a session share the page, whatever path read the
    (empty) session; with a foreign session middleware inside the cache, only
    requests without any cookie do (the cache cannot know its cookie)."""
    app = _app(stack, READS["orjson.dumps"], real_redis, key_prefix)
    async with client_for(app) as one, client_for(app) as two:
        first = await one.get("/page")
        second = await two.get("/page")
    assert first.text == second.text == "page of {}"
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")


async def test_a_route_that_ignores_the_session_is_shared_by_logged_in_visitors(
    real_redis: Redis, key_prefix: str
) -> None:
    calls: list[str] = []

    async def login(request: Request) -> Response:
        request.session["user"] = request.query_params["user"]
        return PlainTextResponse("welcome")

    @cached(ttl=60, ignores_session=True)
    async def report(request: Request) -> Response:
        calls.append("report")
        return PlainTextResponse("the same report for everyone")

    @cached(ttl=60, ignores_session=True)
    async def broken_promise(request: Request) -> Response:
        return PlainTextResponse(f"page of {request.session.get('user')}")

    app = Starlette(
        routes=[Route("/login", login), Route("/report", report), Route("/b", broken_promise)],
        middleware=[
            Middleware(CacheMiddleware, redis=real_redis, key_prefix=key_prefix + "c:"),
            Middleware(
                SessionMiddleware, secret_key=SECRET, redis=real_redis, key_prefix=key_prefix
            ),
        ],
    )
    async with client_for(app) as alice, client_for(app) as bob:
        for client, user in ((alice, "alice"), (bob, "bob")):
            await client.get(f"/login?user={user}")
        states = [(await c.get("/report")).headers["x-cache"] for c in (alice, bob)]
        assert states == ["MISS", "HIT"]
        assert calls == ["report"]
        # A read the cache can see still keeps the page out, promise or not.
        assert (await alice.get("/b")).headers["x-cache-reason"] == "session"
        assert (await bob.get("/b")).text == "page of bob"
