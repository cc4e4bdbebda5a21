"""The cache with the REAL SessionMiddleware on a real Redis: no private page
reaches another client, whatever the middleware order, cookie name or cookie
tricks (checklist 13 and 22 together)."""

from __future__ import annotations

import secrets
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

from asgi_redis_kit import (
    Cache,
    CacheMiddleware,
    Session,
    SessionMiddleware,
    SessionStore,
    cached,
)
from asgi_redis_kit.cache._discovery import chain
from tests.cache.conftest import Framework
from tests.support import RedisSpy, counting_client, free_port

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


def client_for(app: Any) -> httpx.AsyncClient:
    # https: a ``__Host-`` cookie is Secure, and the cookie jar only sends it back there.
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://testserver", timeout=30
    )


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


@pytest.mark.parametrize(
    "cookie", [{"cookie_name": "sid"}, {"host_prefix": True}], ids=["sid", "host-prefix"]
)
async def test_the_session_cookie_name_is_learned_from_the_session_middleware(
    framework: Framework, options: dict[str, dict[str, Any]], cookie: dict[str, Any]
) -> None:
    """A default CacheMiddleware around ``SessionMiddleware(cookie_name="sid")`` or
    ``host_prefix=True`` (``__Host-session``) keys ``vary_on_session`` pages on
    that cookie: Bob never gets Alice's page."""
    app = session_app(framework, cache=options["cache"], session={**options["session"], **cookie})
    async with client_for(app) as alice, client_for(app) as bob:
        name = (await log_in(alice, "alice")).split("=")[0]
        assert name == ("sid" if "cookie_name" in cookie else "__Host-session")
        await log_in(bob, "bob")
        first = await alice.get("/me")
        assert (first.text, first.headers["x-cache"]) == ("private page of alice", "MISS")
        assert (await alice.get("/me")).headers["x-cache"] == "HIT"
        assert (await bob.get("/me")).text == "private page of bob"
        assert (await bob.get("/me")).text == "private page of bob"
        assert (await alice.get("/me")).text == "private page of alice"
        # Duplicates of the detected name are caught too.
        dup = await bob.get("/me", headers={"cookie": f"{name}=x; {name}=y"})
        assert dup.headers["x-cache-reason"] == "cookie"


async def test_a_session_cookie_option_that_contradicts_the_session_middleware_fails(
    framework: Framework, options: dict[str, dict[str, Any]]
) -> None:
    """An explicit ``session_cookie`` that is not the cookie SessionMiddleware
    uses is a configuration error, reported on the first request (and on every
    one after it) instead of guessed at."""
    app = session_app(
        framework,
        cache={**options["cache"], "session_cookie": "session"},
        session={**options["session"], "cookie_name": "sid"},
    )
    async with client_for(app) as client:
        for _ in range(2):
            with pytest.raises(ValueError, match=r"session_cookie='session'.*'sid'"):
                await client.get("/me")
    matching = session_app(
        framework,
        cache={**options["cache"], "session_cookie": "sid"},
        session={**options["session"], "cookie_name": "sid"},
    )
    async with client_for(matching) as client:
        await log_in(client, "carol")
        assert (await client.get("/me")).text == "private page of carol"
        assert (await client.get("/me")).headers["x-cache"] == "HIT"


@pytest.mark.parametrize("cookie_name", ["session", "sid"])
async def test_a_cache_inside_the_session_middleware_keeps_pages_apart(
    framework: Framework, options: dict[str, dict[str, Any]], cookie_name: str
) -> None:
    """``[SessionMiddleware, CacheMiddleware]`` (what FastAPI's add_middleware
    order makes easy): the cache sees no ``Vary: Cookie`` from inside, so it
    asks the loaded session. A shared route whose handler read it is not
    stored; ``vary_on_session`` entries key on the loaded session, and a
    cookie whose session is gone counts as no session."""
    app = session_app(
        framework,
        cache=options["cache"],
        session={**options["session"], "cookie_name": cookie_name},
        order="session-outside",
    )
    async with client_for(app) as alice, client_for(app) as bob, client_for(app) as thief:
        alice_cookie = await log_in(alice, "alice")
        await log_in(bob, "bob")
        first = await alice.get("/whoami")
        assert (first.text, first.headers["x-cache-reason"]) == ("private page of alice", "session")
        assert (await bob.get("/whoami")).text == "private page of bob"
        # Anonymous visitors still share the shared route.
        assert (await thief.get("/whoami")).headers["x-cache-reason"] == "session"

        assert (await alice.get("/me")).text == "private page of alice"
        assert (await alice.get("/me")).headers["x-cache"] == "HIT"
        assert (await bob.get("/me")).text == "private page of bob"
        await alice.get("/logout")
        replayed = await thief.get("/me", headers={"cookie": alice_cookie})
        assert replayed.text == "private page of anonymous"


async def test_a_cache_inside_a_foreign_session_middleware_stores_only_vary_on_session(
    real_redis: Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Inside Starlette's own SessionMiddleware (a plain dict that cannot say
    whether it was read) only ``vary_on_session`` routes are stored, keyed on
    the cookie; one warning per middleware says why."""
    from starlette.middleware.sessions import SessionMiddleware as CookieSessions

    async def login(request: Request) -> Response:
        request.session["user"] = request.query_params["user"]
        return PlainTextResponse("welcome")

    @cached(ttl=60)
    async def whoami(request: Request) -> Response:
        return PlainTextResponse(_page(request))

    @cached(ttl=60, vary_on_session=True)
    async def me(request: Request) -> Response:
        return PlainTextResponse(_page(request))

    app = Starlette(
        routes=[Route("/login", login), Route("/whoami", whoami), Route("/me", me)],
        middleware=[
            Middleware(CookieSessions, secret_key=SECRET),
            Middleware(CacheMiddleware, redis=real_redis, key_prefix=key_prefix),
        ],
    )
    caplog.set_level("WARNING", logger="asgi_redis_kit.cache")
    async with client_for(app) as alice, client_for(app) as bob:
        await log_in(alice, "alice")
        await log_in(bob, "bob")
        for _ in range(2):
            # Starlette's cookie name is learned too: its cookie bypasses a shared route.
            page = await alice.get("/whoami")
            assert (page.headers["x-cache"], page.headers["x-cache-reason"]) == (
                "BYPASS",
                "session",
            )
        assert (await bob.get("/whoami")).text == "private page of bob"
        assert (await alice.get("/me")).text == "private page of alice"
        assert (await alice.get("/me")).headers["x-cache"] == "HIT"
        assert (await bob.get("/me")).text == "private page of bob"
    async with client_for(app) as anonymous:
        for _ in range(2):  # its empty session reaches the rule that warns
            await anonymous.get("/whoami")
    warnings = [r for r in caplog.records if "not asgi_redis_kit's Session" in r.getMessage()]
    assert len(warnings) == 1


async def _form(request: Request) -> Response:
    """A per-visitor form: the first visit stores a CSRF token in a new session."""
    session = request.session
    if "csrf" not in session:
        session["csrf"] = secrets.token_hex(8)
    return PlainTextResponse(f"form with token {session['csrf']}")


@pytest.mark.parametrize("order", ["cache-outside", "session-outside", "starlette-outside"])
async def test_a_response_that_changed_the_session_is_never_stored(
    options: dict[str, dict[str, Any]], order: str
) -> None:
    """A ``vary_on_session`` page whose handler writes a new visitor's session:
    stored under the no-session key, the first visitor's CSRF token would be
    every anonymous visitor's. With the cache outside, the Set-Cookie keeps it
    out; with a session middleware outside (ours or Starlette's), which saves
    and sets the cookie after the cache saw the response, the change does."""
    from starlette.middleware.sessions import SessionMiddleware as CookieSessions

    form = cached(ttl=60, vary_on_session=True)(_form)
    layers = [
        Middleware(CacheMiddleware, **options["cache"]),
        Middleware(SessionMiddleware, secret_key=SECRET, **options["session"]),
    ]
    if order == "session-outside":
        layers.reverse()
    elif order == "starlette-outside":
        layers = [Middleware(CookieSessions, secret_key=SECRET), layers[0]]
    app = Starlette(routes=[Route("/form", form)], middleware=layers)
    async with client_for(app) as alice, client_for(app) as bob:
        alice_page = await alice.get("/form")
        bob_page = await bob.get("/form")
        assert alice_page.text != bob_page.text, "bob was served alice's token"
        assert "set-cookie" in bob_page.headers
        # With its session saved, alice's page is cached for alice alone.
        assert (await alice.get("/form")).text == alice_page.text
        assert (await bob.get("/form")).text == bob_page.text


@pytest.mark.parametrize("order", ["cache-outside", "session-outside"])
@pytest.mark.parametrize("write", ["assign", "incr"])
async def test_a_page_that_changes_a_logged_in_session_is_not_stored(
    options: dict[str, dict[str, Any]], order: str, write: str
) -> None:
    """A hit would skip the handler's change: each view must still count."""

    @cached(ttl=60, vary_on_session=True)
    async def views(request: Request) -> Response:
        session = Session.of(request)
        if write == "incr":
            count = await session.incr("views")
        else:
            count = session["views"] = session.get("views", 0) + 1
        return PlainTextResponse(f"view {count}")

    layers = [
        Middleware(CacheMiddleware, **options["cache"]),
        Middleware(SessionMiddleware, secret_key=SECRET, **options["session"]),
    ]
    app = Starlette(
        routes=[Route("/login", _login), Route("/views", views)],
        middleware=layers if order == "cache-outside" else layers[::-1],
    )
    async with client_for(app) as alice:
        await log_in(alice, "alice")
        pages = [await alice.get("/views") for _ in range(3)]
    assert [page.text for page in pages] == ["view 1", "view 2", "view 3"]
    assert {page.headers["x-cache-reason"] for page in pages} == {"session"}


async def test_a_logged_out_or_revoked_cookie_gets_none_of_the_cached_pages(
    framework: Framework,
    options: dict[str, dict[str, Any]],
    real_redis: Redis,
    key_prefix: str,
    spy: RedisSpy,
) -> None:
    """Checklist 13 with the cache in front: a ``vary_on_session`` hit proves
    the session still exists in the same round trip as the lookup (the session
    store shares the cache's Redis here), so after ``clear()`` or
    ``revoke_user`` a stolen cookie gets an anonymous page, never a HIT."""
    app = session_app(framework, cache=options["cache"], session=options["session"])
    async with client_for(app) as alice, client_for(app) as thief:
        cookie = await log_in(alice, "alice")
        assert (await alice.get("/me")).headers["x-cache"] == "MISS"
        spy.reset()
        hit = await alice.get("/me")
        assert (hit.text, hit.headers["x-cache"]) == ("private page of alice", "HIT")
        assert spy.round_trips == 1
        assert (await thief.get("/me", headers={"cookie": cookie})).headers["x-cache"] == "HIT"

        await alice.get("/logout")
        replayed = await thief.get("/me", headers={"cookie": cookie})
        assert replayed.text == "private page of anonymous"
        assert replayed.headers["x-cache"] != "HIT"
        assert (await thief.get("/me", headers={"cookie": cookie})).headers["x-cache"] != "HIT"

        cookie = await log_in(alice, "alice")
        await alice.get("/me")
        assert (await alice.get("/me")).headers["x-cache"] == "HIT"
        async with SessionStore(real_redis, key_prefix=key_prefix + "s:") as store:
            assert await store.revoke_user("alice") == 1
        replayed = await thief.get("/me", headers={"cookie": cookie})
        assert replayed.text == "private page of anonymous"
        # A tampered signature is no session at all: the anonymous entry.
        name, value = cookie.split("=", 1)
        tampered = await thief.get("/me", headers={"cookie": f"{name}={value[:-2]}xx"})
        assert tampered.text == "private page of anonymous"


async def test_a_session_store_on_another_client_is_asked_alongside_the_lookup(
    framework: Framework,
    options: dict[str, dict[str, Any]],
    redis_url: str,
    key_prefix: str,
    spy: RedisSpy,
) -> None:
    """Sessions on their own client: a ``vary_on_session`` hit is one cache
    round trip plus one EXISTS sent to the session store at the same time."""
    session_spy = RedisSpy()
    session_redis = counting_client(redis_url, session_spy)
    app = session_app(
        framework,
        cache=options["cache"],
        session={**options["session"], "redis": session_redis},
    )
    try:
        async with client_for(app) as alice, client_for(app) as thief:
            cookie = await log_in(alice, "alice")
            await alice.get("/me")
            spy.reset()
            session_spy.reset()
            assert (await alice.get("/me")).headers["x-cache"] == "HIT"
            assert (spy.round_trips, session_spy.round_trips) == (1, 1)
            assert session_spy.commands == {"EXISTS": 1}
            await alice.get("/logout")
            replayed = await thief.get("/me", headers={"cookie": cookie})
            assert replayed.text == "private page of anonymous"
    finally:
        keys = [key async for key in session_redis.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await session_redis.delete(*keys)
        await session_redis.aclose()


def _connected(cache: Cache) -> int:
    client = cache.backend.client
    assert isinstance(client, Redis)
    pool = client.connection_pool
    return sum(1 for connection in pool._available_connections if connection.is_connected)


async def test_closing_the_middleware_and_the_cache_and_what_invalidation_returns(
    framework: Framework,
    options: dict[str, dict[str, Any]],
    redis_url: str,
    key_prefix: str,
) -> None:
    """``await middleware.aclose()`` closes the Cache the middleware made from a
    URL (the README promises it), ``async with Cache(...)`` closes its own, and
    ``invalidate()`` answers like ``invalidate_tags()``: counters bumped."""
    prefix = key_prefix + "c:"
    app = session_app(
        framework, cache={"redis": redis_url, "key_prefix": prefix}, session=options["session"]
    )
    async with client_for(app) as alice:
        await log_in(alice, "alice")
        await alice.get("/me")
        assert (await alice.get("/me")).headers["x-cache"] == "HIT"
        async with Cache(redis_url, key_prefix=prefix) as admin:
            assert await admin.invalidate("https://testserver/me") == 1
            assert await admin.invalidate_tags("a", "b") == 2
            assert await admin.invalidate_tags() == 0
            assert _connected(admin) == 1
        assert _connected(admin) == 0
        assert (await alice.get("/me")).headers["x-cache"] == "MISS"
        middleware = next(
            layer for layer in chain(app.middleware_stack) if isinstance(layer, CacheMiddleware)
        )
        assert _connected(middleware.cache) >= 1
        await middleware.aclose()
        assert _connected(middleware.cache) == 0

    # A Cache passed in stays the caller's.
    async with Cache(redis_url, key_prefix=prefix) as mine:
        wrapped = CacheMiddleware(app, cache=mine)
        first = await mine.clear()
        await wrapped.aclose()
        assert await mine.clear() == first + 1  # still open


@pytest.mark.parametrize(
    "ignored",
    [{"redis": "redis://localhost:6379/0"}, {"key_prefix": "x:"}, {"session_cookie": "sid"}],
)
async def test_options_a_given_cache_would_ignore_are_rejected(
    options: dict[str, dict[str, Any]], redis_url: str, ignored: dict[str, Any]
) -> None:
    async with Cache(redis_url) as cache:
        with pytest.raises(ValueError, match=rf"cache=.*{next(iter(ignored))}"):
            CacheMiddleware(
                session_app("starlette", cache={}, session=options["session"]),
                cache=cache,
                **ignored,
            )
        app = session_app(
            "starlette", cache={"cache": cache, **ignored}, session=options["session"]
        )
        async with client_for(app) as client:
            with pytest.raises(ValueError, match="cache="):
                await client.get("/me")


async def test_a_cache_wrapping_a_whole_application_finds_its_session_middleware(
    framework: Framework, options: dict[str, dict[str, Any]]
) -> None:
    """``CacheMiddleware(app)`` around an application whose middleware stack is
    built on its first call still learns the cookie name and proves sessions."""
    inner = session_app(framework, cache={}, session={**options["session"], "cookie_name": "sid"})
    inner.user_middleware = [m for m in inner.user_middleware if m.cls is not CacheMiddleware]
    app = CacheMiddleware(inner, **options["cache"])
    async with client_for(app) as alice, client_for(app) as bob, client_for(app) as thief:
        cookie = await log_in(alice, "alice")
        await log_in(bob, "bob")
        assert (await alice.get("/me")).text == "private page of alice"
        assert (await bob.get("/me")).text == "private page of bob"
        await alice.get("/logout")
        assert (await thief.get("/me", headers={"cookie": cookie})).text == (
            "private page of anonymous"
        )
    await app.aclose()


async def test_a_session_that_failed_to_load_outside_the_cache_is_no_session(
    framework: Framework, options: dict[str, dict[str, Any]]
) -> None:
    """Session store down, SessionMiddleware outside the cache: the placeholder
    session it leaves is never touched by the cache (touching it answers 503),
    and counts as no session; a handler that uses it gets the 503, never stored."""
    from asgi_redis_kit.sessions._cookie import CookieSigner

    app = session_app(
        framework,
        cache=options["cache"],
        session={**options["session"], "redis": f"redis://127.0.0.1:{free_port()}/0"},
        order="session-outside",
    )

    @cached(ttl=60, vary_on_session=True)
    async def news(request: Request) -> Response:
        return PlainTextResponse("news")  # never reads the session

    app.router.routes.append(Route("/news", news))
    cookie = {"cookie": "session=" + CookieSigner(SECRET).sign("a" * 43)}
    async with client_for(app) as user:
        for state in ("MISS", "HIT"):
            served = await user.get("/news", headers=cookie)
            assert (served.status_code, served.text, served.headers["x-cache"]) == (
                200,
                "news",
                state,
            )
        for _ in range(2):
            assert (await user.get("/me", headers=cookie)).status_code == 503
