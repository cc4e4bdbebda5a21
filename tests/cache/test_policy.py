"""Behaviour 3: safe by default (checklist 20-24, 26, 27)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache, SessionMiddleware, cached
from asgi_redis_kit.cache._policy import host_allowed
from tests.cache.conftest import Harness


async def twice(harness: Harness, url: str, **kwargs: object) -> tuple[str, str, str]:
    """(first X-Cache, second X-Cache, the reason the first was not stored)."""
    first = await harness.client.get(url, **kwargs)  # type: ignore[arg-type]
    second = await harness.client.get(url, **kwargs)  # type: ignore[arg-type]
    return (
        first.headers["x-cache"],
        second.headers["x-cache"],
        first.headers.get("x-cache-reason", ""),
    )


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("h=set-cookie:a=b", "set-cookie"),
        ("h=cache-control:private", "cache-control"),
        ("h=cache-control:max-age=5, no-store", "cache-control"),
        ("h=cache-control:no-cache", "cache-control"),
        ("h=vary:*", "vary"),
        ("h=vary:Accept-Encoding, *", "vary"),  # a learnable name does not make * storable
        ("status=500", "status"),
        ("status=302&h=location:/x", "status"),
        ("status=206", "status"),
    ],
)
async def test_uncacheable_responses_are_never_stored(
    harness: Harness, query: str, reason: str
) -> None:
    assert await twice(harness, f"/echo?{query}") == ("MISS", "MISS", reason)
    assert harness.calls["echo"] == 2  # the repeated request reached the handler


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 404, 410])
async def test_cacheable_statuses_are_stored(harness: Harness, status: int) -> None:
    first, second, _ = await twice(harness, f"/echo?status={status}")
    assert (first, second) == ("MISS", "HIT")


async def test_cacheable_statuses_are_configurable(real_redis: Redis, key_prefix: str) -> None:
    from tests.cache.conftest import Calls, build, client_for

    cache = Cache(real_redis, key_prefix=key_prefix, cacheable_statuses={200})
    calls = Calls()
    async with client_for(build("starlette", cache, calls)) as client:
        for _ in range(2):
            response = await client.get("/echo?status=404")
            assert response.headers["x-cache-reason"] == "status"
    await cache.aclose()


async def test_non_get_and_get_with_body_bypass(harness: Harness) -> None:
    post = await harness.client.post("/page")
    assert (post.headers["x-cache"], post.headers["x-cache-reason"]) == ("BYPASS", "method")
    for _ in range(2):
        with_body = await harness.client.request("GET", "/page", content=b"x=1")
        assert (with_body.headers["x-cache"], with_body.headers["x-cache-reason"]) == (
            "BYPASS",
            "body",
        )
    assert (await harness.client.get("/page")).headers["x-cache"] == "MISS"
    assert harness.calls["page"] == 4


async def test_authorization_bypasses_unless_public(harness: Harness) -> None:
    await harness.client.get("/page")  # an entry exists
    auth = {"authorization": "Bearer user-a"}
    for _ in range(2):
        response = await harness.client.get("/page", headers=auth)
        assert (response.headers["x-cache"], response.headers["x-cache-reason"]) == (
            "BYPASS",
            "authorization",
        )
    assert harness.calls["page"] == 3  # neither served from nor stored in the cache
    assert await twice(harness, "/public", headers=auth) == ("MISS", "HIT", "")


async def test_session_reading_response_is_not_shared(harness: Harness) -> None:
    """Checklist 22: a request with a session cookie to a route whose handler
    reads the session is never served another user's response: it bypasses the
    cache before any lookup."""
    a, b = {"cookie": "session=alice"}, {"cookie": "session=bob"}
    first = await harness.client.get("/whoami", headers=a)
    assert (first.headers["x-cache"], first.headers["x-cache-reason"]) == ("BYPASS", "session")
    assert (await harness.client.get("/whoami", headers=b)).text == "user bob call 2"
    assert (await harness.client.get("/whoami", headers=a)).text == "user alice call 3"
    # Anonymous requests (no cookie, session not read) share one entry.
    assert await twice(harness, "/whoami") == ("MISS", "HIT", "")
    assert (await harness.client.get("/whoami", headers=b)).text == "user bob call 5"


async def test_vary_on_session_gives_each_user_an_entry(harness: Harness) -> None:
    a, b = {"cookie": "session=alice"}, {"cookie": "session=bob"}
    responses = [await harness.client.get("/mine", headers=h) for h in (a, b, a, b)]
    assert [r.text for r in responses] == [
        "user alice call 1",
        "user bob call 2",
        "user alice call 1",
        "user bob call 2",
    ]
    assert [r.headers["x-cache"] for r in responses] == ["MISS", "MISS", "HIT", "HIT"]
    assert responses[2].headers["cache-control"].startswith("private")
    anonymous = await harness.client.get("/mine")
    assert anonymous.text == "anonymous call 3"


async def test_sessions_with_data_share_only_a_route_that_ignores_the_session(
    harness: Harness,
) -> None:
    """FakeSession puts the cookie's value in the session: a session with data
    counts as read (its readers cannot all be seen), unless the route promises
    otherwise (a session-cookie request to a shared route bypasses the cache);
    anonymous and cookie-bearing requests never share an entry."""
    for path in ("/page", "/shared"):
        alice = await harness.client.get(path, headers={"cookie": "session=alice"})
        bob = await harness.client.get(path, headers={"cookie": "session=bob"})
        anonymous = await harness.client.get(path)
        again = await harness.client.get(path)
        states = [r.headers["x-cache"] for r in (alice, bob, anonymous, again)]
        if path == "/page":
            assert states == ["BYPASS", "BYPASS", "MISS", "HIT"]
            assert bob.headers["x-cache-reason"] == "session"
        else:
            assert states == ["MISS", "HIT", "MISS", "HIT"]


def test_a_route_cannot_both_vary_on_and_ignore_the_session() -> None:
    with pytest.raises(ValueError, match="contradict"):
        cached(ttl=1, vary_on_session=True, ignores_session=True)


@pytest.mark.parametrize(
    "poison",
    [
        {"x-forwarded-host": "evil.example"},
        {"x-forwarded-proto": "http"},
        {"forwarded": "host=evil.example;proto=http"},
        {"x-original-url": "/admin"},
        {"x-rewrite-url": "/admin"},
        {"x-http-method-override": "DELETE"},
    ],
)
async def test_forwarding_and_override_headers_cannot_poison_plain_requests(
    harness: Harness, poison: dict[str, str]
) -> None:
    poisoned = await harness.client.get("/forwarded", headers=poison)
    assert poisoned.status_code == 200
    plain = await harness.client.get("/forwarded")
    assert plain.headers["x-cache"] == "MISS"
    assert "evil" not in plain.text
    assert (await harness.client.get("/forwarded")).headers["x-cache"] == "HIT"


async def test_override_headers_bypass(harness: Harness) -> None:
    response = await harness.client.get("/page", headers={"x-http-method-override": "POST"})
    assert (response.headers["x-cache"], response.headers["x-cache-reason"]) == (
        "BYPASS",
        "override",
    )


@pytest.mark.parametrize(
    "path", ["/account/x.css", "/account;x.css", "/account%2Fx.css", "/account%23.css"]
)
async def test_path_tricks_are_never_stored_under_a_cached_route(
    harness: Harness, path: str
) -> None:
    for _ in range(2):
        response = await harness.client.get(path)
        assert "x-cache" not in response.headers  # did not match the @cached route
        assert response.status_code == 404
    assert harness.calls["account"] == 0
    assert (await harness.client.get("/account")).headers["x-cache"] == "MISS"


async def test_oversized_and_streamed_bodies_are_not_stored(harness: Harness) -> None:
    assert await twice(harness, "/big") == ("MISS", "MISS", "size")
    first, second, reason = await twice(harness, "/stream")
    assert (first, second, reason) == ("MISS", "MISS", "streaming")
    assert (await harness.client.get("/stream")).text == "one two three"


def test_host_allowlist_patterns() -> None:
    assert host_allowed("a.example:8000", ["a.example"])
    assert host_allowed("x.b.example", ["*.b.example"])
    assert not host_allowed("b.example", ["*.b.example"])
    assert not host_allowed("evil.example", ["a.example"])
    assert host_allowed("anything", None)


async def test_real_session_middleware_response_is_not_shared(
    real_redis: Redis, key_prefix: str
) -> None:
    """The real SessionMiddleware's ``Vary: Cookie`` keeps per-user pages apart."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from asgi_redis_kit import CacheMiddleware, cached
    from tests.cache.conftest import client_for

    async def login(request: Request) -> Response:
        request.session["user"] = request.query_params["user"]
        return PlainTextResponse("ok")

    @cached(ttl=60)
    async def profile(request: Request) -> Response:
        return PlainTextResponse(f"hello {request.session.get('user', 'anonymous')}")

    cache = Cache(real_redis, key_prefix=key_prefix)
    app = Starlette(
        routes=[Route("/login", login), Route("/profile", profile)],
        middleware=[
            Middleware(CacheMiddleware, cache=cache),
            Middleware(
                SessionMiddleware,
                secret_key="s" * 32,
                redis=real_redis,
                key_prefix=key_prefix + "s:",
            ),
        ],
    )
    async with client_for(app) as alice, client_for(app) as bob:
        await alice.get("/login?user=alice")
        await bob.get("/login?user=bob")
        assert (await alice.get("/profile")).text == "hello alice"
        assert (await bob.get("/profile")).text == "hello bob"
        assert (await alice.get("/profile")).text == "hello alice"
    # Their session cookies bypass the shared route (checklist 22).
    assert cache.stats.bypass["session"] >= 3
    await cache.aclose()


async def test_an_answer_the_cached_endpoint_did_not_produce_is_not_stored(
    real_redis: Redis, key_prefix: str
) -> None:
    """A FastAPI dependency that answers 404 before the handler runs: the status
    is cacheable, but the @cached endpoint never ran, so nothing is stored."""
    from fastapi import Depends, FastAPI, HTTPException
    from starlette.middleware import Middleware

    from asgi_redis_kit import CacheMiddleware, cached
    from tests.cache.conftest import client_for

    def must_exist(slug: str) -> str:
        if slug == "missing":
            raise HTTPException(404)
        return slug

    cache = Cache(real_redis, key_prefix=key_prefix)
    app = FastAPI(middleware=[Middleware(CacheMiddleware, cache=cache)])

    @app.get("/docs/{slug}")
    @cached(ttl=60)
    async def doc(slug: str = Depends(must_exist)) -> dict[str, str]:
        return {"slug": slug}

    async with client_for(app) as client:
        for _ in range(2):
            response = await client.get("/docs/missing")
            assert (response.status_code, response.headers["x-cache-reason"]) == (404, "route")
        assert (await client.get("/docs/a")).headers["x-cache"] == "MISS"
        assert (await client.get("/docs/a")).headers["x-cache"] == "HIT"
    await cache.aclose()
