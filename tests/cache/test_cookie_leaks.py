"""Cookies the cache must not share across visitors: every cookie of a
``vary_on_session`` page, the session cookie of a shared page, and session
middlewares whose cookie name the cache could not learn (review c1)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware as CookieSessions
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Cache, CacheMiddleware, SessionMiddleware, cached
from tests.cache.conftest import client_for
from tests.support import Opaque

pytestmark = pytest.mark.real_redis

SECRET = "c1-cookie-secret-0123456789abcdef0123"


async def login(request: Request) -> Response:
    request.session["user"] = request.query_params["user"]
    return PlainTextResponse("welcome")


def cookie_app(cache: Cache, calls: Counter[str], layers: Sequence[Middleware] = ()) -> Starlette:
    """``/theme``: a vary_on_session page showing a cookie of its own."""

    @cached(ttl=60, vary_on_session=True)
    async def theme(request: Request) -> Response:
        calls["theme"] += 1
        return PlainTextResponse(f"theme {request.cookies.get('theme', 'none')}")

    return Starlette(
        routes=[Route("/theme", theme)],
        middleware=[Middleware(CacheMiddleware, cache=cache), *layers],
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ([("cookie", "theme=dark")], [("cookie", "theme=light")]),
        # Starlette keeps the last of a repeated name: their order is data.
        ([("cookie", "theme=dark; theme=light")], [("cookie", "theme=light; theme=dark")]),
        # Starlette reads the first Cookie line only.
        ([("cookie", "a=1"), ("cookie", "theme=dark")], [("cookie", "a=1; theme=dark")]),
        ([("cookie", "session=x; theme=dark")], [("cookie", "session=x; theme=light")]),
        # A quoted value is another value to the handler.
        ([("cookie", 'theme=""dark""')], [("cookie", "theme=dark")]),
    ],
    ids=["value", "repeat-order", "second-line", "with-session", "quotes"],
)
async def test_a_vary_on_session_page_keys_every_other_cookie(
    real_redis: Redis, key_prefix: str, first: list[tuple[str, str]], second: list[tuple[str, str]]
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    async with client_for(cookie_app(cache, calls)) as c:
        one = await c.get("/theme", headers=first)
        two = await c.get("/theme", headers=second)
    await cache.aclose()
    assert calls["theme"] == 2, (one.text, two.text, two.headers.get("x-cache"))


async def test_requests_with_the_same_other_cookies_still_share(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls: Counter[str] = Counter()
    async with client_for(cookie_app(cache, calls)) as c:
        states = [
            (await c.get("/theme", headers={"cookie": cookie})).headers["x-cache"]
            for cookie in ("theme=dark; a=1", "a=1;theme=dark", "a=1; theme=dark")
        ]
        anonymous = [(await c.get("/theme")).headers["x-cache"] for _ in range(2)]
    await cache.aclose()
    assert states == ["MISS", "HIT", "HIT"]
    assert anonymous == ["MISS", "HIT"]


async def test_anonymous_readers_of_a_vary_on_session_page_still_share(
    real_redis: Redis, key_prefix: str
) -> None:
    """The fail-safe for unknown cookie names keeps an empty session's page."""

    @cached(ttl=60, vary_on_session=True)
    async def me(request: Request) -> Response:
        return PlainTextResponse(f"page of {request.session.get('user', 'nobody')}")

    for order in ("cache-outside", "session-outside"):
        layers = [
            Middleware(CacheMiddleware, redis=real_redis, key_prefix=key_prefix + order),
            Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis),
        ]
        if order == "session-outside":
            layers.reverse()
        app = Starlette(routes=[Route("/me", me)], middleware=layers)
        async with client_for(app) as c:
            states = [(await c.get("/me")).headers["x-cache"] for _ in range(2)]
        assert states == ["MISS", "HIT"], order


def shared_app(layers: Sequence[Middleware]) -> Starlette:
    @cached(ttl=60)
    async def home(request: Request) -> Response:
        user = request.scope["session"].get("user")  # not request.session
        return PlainTextResponse(f"hello {user or 'guest'}")

    return Starlette(routes=[Route("/login", login), Route("/home", home)], middleware=list(layers))


def cache_layer(real_redis: Redis, key_prefix: str) -> Middleware:
    return Middleware(CacheMiddleware, redis=real_redis, key_prefix=key_prefix)


@pytest.mark.parametrize(
    "setup",
    ["ours-opaque-inside", "starlette-outside", "starlette-inside", "starlette-opaque-outside"],
)
async def test_a_guest_page_never_reaches_a_logged_in_user(
    real_redis: Redis, key_prefix: str, setup: str
) -> None:
    """Siblings of the empty-session poisoning where the session cookie is not
    called ``session`` and the cache may not find its middleware."""
    ours = Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis, cookie_name="sid")
    starlette = Middleware(CookieSessions, secret_key=SECRET, session_cookie="sid")
    cache = cache_layer(real_redis, key_prefix)
    layers = {
        "ours-opaque-inside": [cache, Middleware(Opaque), ours],
        "starlette-outside": [starlette, cache],
        "starlette-inside": [cache, starlette],
        "starlette-opaque-outside": [Middleware(Opaque), starlette, cache],
    }[setup]
    app = shared_app(layers)
    async with client_for(app) as alice, client_for(app) as stale:
        await alice.get("/login", params={"user": "alice"})
        guest = await stale.get("/home", headers={"cookie": "sid=expired-or-garbage"})
        page = await alice.get("/home")
    assert guest.text == "hello guest"
    assert page.text == "hello alice", page.headers.get("x-cache")


@pytest.mark.parametrize("name", ["session", "sid"])
async def test_the_session_cookie_bypasses_a_shared_route(
    real_redis: Redis, key_prefix: str, name: str
) -> None:
    """Checklist 22: the cookie the session middleware reads, whatever its name
    (ours, or Starlette's), bypasses a route shared by everyone, before any lookup."""
    for session in (
        Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis, cookie_name=name),
        Middleware(CookieSessions, secret_key=SECRET, session_cookie=name),
    ):
        app = shared_app([cache_layer(real_redis, key_prefix), session])
        async with client_for(app) as c:
            response = await c.get("/home", headers={"cookie": f"{name}=garbage"})
            other = await c.get("/home", headers={"cookie": "other=1"})
        assert (response.headers["x-cache"], response.headers["x-cache-reason"]) == (
            "BYPASS",
            "session",
        )
        assert other.headers["x-cache"] in ("MISS", "HIT")


async def test_a_hidden_session_middleware_with_another_cookie_name_is_named_in_a_warning(
    real_redis: Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    @cached(ttl=60)
    async def plain(request: Request) -> Response:
        return PlainTextResponse("same for all")

    app = Starlette(
        routes=[Route("/plain", plain)],
        middleware=[
            cache_layer(real_redis, key_prefix),
            Middleware(Opaque),
            Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis, cookie_name="sid"),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="asgi_redis_kit.cache"):
        async with client_for(app) as c:
            responses = [await c.get("/plain") for _ in range(2)]
    assert [r.headers.get("x-cache-reason") for r in responses] == ["session", "session"]
    warnings = [r.getMessage() for r in caplog.records if "'sid'" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "'session'" in warnings[0]


async def test_a_foreign_session_holding_data_outside_bypasses_a_shared_route(
    real_redis: Redis, key_prefix: str
) -> None:
    """A session already loaded outside the cache that holds data is a
    logged-in visitor, whatever its cookie is called: no shared hit for it."""
    starlette = Middleware(CookieSessions, secret_key=SECRET, session_cookie="sid")
    app = shared_app([Middleware(Opaque), starlette, cache_layer(real_redis, key_prefix)])
    async with client_for(app) as anonymous, client_for(app) as alice:
        first = await anonymous.get("/home")
        await alice.get("/login", params={"user": "alice"})
        page = await alice.get("/home")
    assert first.headers["x-cache"] == "MISS"
    assert page.text == "hello alice"
    assert (page.headers["x-cache"], page.headers["x-cache-reason"]) == ("BYPASS", "session")


@pytest.mark.parametrize(
    "setup", ["ours-opaque-inside", "starlette-opaque-inside", "starlette-opaque-outside"]
)
async def test_a_hidden_session_middleware_never_shares_a_vary_on_session_page(
    real_redis: Redis, key_prefix: str, setup: str
) -> None:
    """The fail-safe: a session holding data whose cookie the key did not see
    is never stored, wherever the unknown session middleware sits."""

    @cached(ttl=60, vary_on_session=True)
    async def me(request: Request) -> Response:
        return PlainTextResponse(f"private page of {request.session.get('user')}")

    ours = Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis, cookie_name="sid")
    starlette = Middleware(CookieSessions, secret_key=SECRET, session_cookie="sid")
    cache = cache_layer(real_redis, key_prefix)
    layers = {
        "ours-opaque-inside": [cache, Middleware(Opaque), ours],
        "starlette-opaque-inside": [cache, Middleware(Opaque), starlette],
        "starlette-opaque-outside": [Middleware(Opaque), starlette, cache],
    }[setup]
    app = Starlette(routes=[Route("/login", login), Route("/me", me)], middleware=layers)
    async with client_for(app) as alice, client_for(app) as bob:
        await alice.get("/login", params={"user": "alice"})
        await bob.get("/login", params={"user": "bob"})
        mine = await alice.get("/me")
        page = await bob.get("/me")
    assert mine.text == "private page of alice"
    assert page.text == "private page of bob", page.headers.get("x-cache")
    # Not stored at all (keying ``sid`` among the other cookies would be enough
    # to keep the two apart; the fail-safe must not depend on it).
    assert mine.headers["x-cache-reason"] == "session"


async def test_a_background_refresh_still_stores_a_logged_in_users_page(
    real_redis: Redis, key_prefix: str
) -> None:
    """The refresh of a stale ``vary_on_session`` entry keys the same user: the
    fail-safe for unkeyed sessions must not keep it from storing."""
    from tests.cache.conftest import Clock, client_for

    clock = Clock()
    calls: Counter[str] = Counter()

    @cached(ttl=10, stale_while_revalidate=100, vary_on_session=True)
    async def me(request: Request) -> Response:
        calls["me"] += 1
        return PlainTextResponse(f"page {calls['me']} of {request.session.get('user')}")

    cache = Cache(real_redis, key_prefix=key_prefix, clock=clock)
    app = Starlette(
        routes=[Route("/login", login), Route("/me", me)],
        middleware=[
            Middleware(CacheMiddleware, cache=cache),
            Middleware(SessionMiddleware, secret_key=SECRET, redis=real_redis),
        ],
    )
    async with client_for(app) as alice:
        await alice.get("/login", params={"user": "alice"})
        assert (await alice.get("/me")).headers["x-cache"] == "MISS"
        clock.advance(20)
        assert (await alice.get("/me")).headers["x-cache"] == "STALE"
        await cache.wait_background()
        fresh = await alice.get("/me")
    await cache.aclose()
    assert (fresh.headers["x-cache"], fresh.text) == ("HIT", "page 2 of alice")


@pytest.mark.parametrize("cookies", [{"theme": "dark"}, {}])
async def test_a_vary_on_session_page_keyed_on_other_cookies_is_private(
    real_redis: Redis, key_prefix: str, cookies: dict[str, str]
) -> None:
    """Keyed on a visitor's cookies, even without a session cookie, the page is
    one visitor's: ``private``, so a shared cache in front (which may ignore
    ``Vary``) keeps it to that visitor. Without any cookie it is everyone's."""
    cache = Cache(real_redis, key_prefix=key_prefix, timeout=5)
    calls: Counter[str] = Counter()
    async with client_for(cookie_app(cache, calls)) as c:
        header = {"cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
        for _ in range(2):
            response = await c.get("/theme", headers=header)
            directives = response.headers["cache-control"].split(", ")
            assert ("private" in directives) == bool(cookies)
    assert calls["theme"] == 1
    await cache.aclose()
