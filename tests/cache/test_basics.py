"""Behaviours 1, 10 and 11: whole responses, the cheapest possible hit, counters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from asgi_redis_kit import (
    Cache,
    CacheMiddleware,
    CacheNotConfigured,
    DuplicateMiddleware,
    SessionMiddleware,
    cached,
    get_cache,
)
from tests.cache.conftest import (
    Calls,
    Framework,
    Harness,
    build,
    client_for,
    fastapi_app,
    starlette_app,
)
from tests.support import Opaque, RedisSpy, counting_client, http_scope


async def test_miss_then_hit_serves_the_same_whole_response(harness: Harness) -> None:
    first = await harness.client.get("/page")
    second = await harness.client.get("/page")
    assert first.status_code == second.status_code == 200
    assert first.text == second.text == "<h1>page 1</h1>"
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert second.headers["content-type"] == first.headers["content-type"]
    assert second.headers["content-type"].startswith("text/html")
    assert second.headers["etag"] == first.headers["etag"]
    assert harness.calls["page"] == 1


async def test_hop_by_hop_headers_are_not_replayed(harness: Harness) -> None:
    url = "/echo?h=x-kept:1&h=keep-alive:timeout=5&h=x-private-hop:1&h=connection:x-private-hop"
    miss = await harness.client.get(url)
    assert miss.headers["x-cache"] == "MISS"
    hit = await harness.client.get(url)
    assert hit.headers["x-cache"] == "HIT"
    assert hit.headers["x-kept"] == "1"
    for name in ("keep-alive", "x-private-hop", "connection"):
        assert name not in hit.headers
    assert harness.calls["echo"] == 1


async def test_head_is_served_from_the_get_entry(harness: Harness) -> None:
    get = await harness.client.get("/page")
    assert get.headers["x-cache"] == "MISS"
    head = await harness.client.head("/page")
    assert head.status_code == 200
    assert head.headers["x-cache"] == "HIT"
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    # A HEAD miss runs the handler as a GET (even where only GET is routed, as in
    # FastAPI), sends no body, and fills the entry a later GET is served from.
    head_miss = await harness.client.head("/items/3")
    assert (head_miss.status_code, head_miss.content) == (200, b"")
    assert head_miss.headers["x-cache"] == "MISS"
    get_hit = await harness.client.get("/items/3")
    assert get_hit.headers["x-cache"] == "HIT"
    assert get_hit.json()["id"] == 3
    assert head_miss.headers["content-length"] == str(len(get_hit.content))
    assert (harness.calls["page"], harness.calls["item"]) == (1, 1)


async def test_fastapi_hits_keep_response_model_filtering(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = Calls()
    async with client_for(build("fastapi", cache, calls)) as client:
        miss = await client.get("/items/7", params={"q": "x"})
        hit = await client.get("/items/7", params={"q": "x"})
    assert miss.json() == hit.json() == {"id": 7, "name": "q=x n=1"}  # no "secret"
    assert hit.headers["x-cache"] == "HIT"
    assert hit.headers["content-type"] == "application/json"
    assert calls["item"] == 1  # a sync handler, run in FastAPI's thread pool once
    await cache.aclose()


async def test_hit_is_one_round_trip_and_runs_no_dependency(
    harness: Harness, spy: RedisSpy
) -> None:
    await harness.client.get("/page")
    dependencies_after_miss = harness.calls["dependency"]
    spy.reset()
    hit = await harness.client.get("/page")
    assert hit.headers["x-cache"] == "HIT"
    assert spy.round_trips == 1
    assert dict(spy.commands) == {"MGET": 1}
    assert harness.calls["dependency"] == dependencies_after_miss  # FastAPI Depends not run


async def test_a_hit_starts_no_task(harness: Harness) -> None:
    """The lookup runs in the request's own task: a hit schedules no Task of ours
    (the shared-lookup machinery only costs something when requests overlap).
    redis-py may start its own (asyncio.wait_for on Python 3.11)."""
    await harness.client.get("/page")
    assert (await harness.client.get("/page")).headers["x-cache"] == "HIT"
    loop = asyncio.get_running_loop()
    created: list[asyncio.Task[Any]] = []
    previous = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        if "asgi_redis_kit" in coro.cr_code.co_filename:
            created.append(task)
        return task

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope()
    loop.set_task_factory(counting)
    try:
        await harness.app(scope, receive, send)
    finally:
        loop.set_task_factory(previous)
    assert (b"x-cache", b"HIT") in sent[0]["headers"]
    assert created == []


async def test_measured_round_trips_per_request(harness: Harness, spy: RedisSpy) -> None:
    """The numbers the README quotes: miss 2, hit 1, 304 1, bypass 0.

    A cold miss: the lookup script (entry, versions, and the lease since the
    entry key is absent), then the store script (entry stored, lease released).
    A hit on an entry this process knows is there: one MGET (no script)."""
    await harness.client.get("/items/0")  # load the Lua scripts once (EVALSHA fallback)
    spy.reset()
    miss = await harness.client.get("/items/1")
    assert miss.headers["x-cache"] == "MISS"
    assert (spy.round_trips, dict(spy.commands)) == (2, {"EVALSHA": 2})
    spy.reset()
    hit = await harness.client.get("/items/1")
    assert (hit.headers["x-cache"], spy.round_trips, dict(spy.commands)) == ("HIT", 1, {"MGET": 1})
    spy.reset()
    not_modified = await harness.client.get(
        "/items/1", headers={"if-none-match": hit.headers["etag"]}
    )
    assert not_modified.status_code == 304
    assert (spy.round_trips, dict(spy.commands)) == (1, {"MGET": 1})
    spy.reset()
    bypass = await harness.client.get("/items/1", headers={"authorization": "Bearer x"})
    assert bypass.headers["x-cache"] == "BYPASS"
    assert spy.round_trips == 0


async def test_a_hit_does_not_load_the_session(
    framework: Framework, real_redis: Redis, redis_url: str, key_prefix: str
) -> None:
    """The real SessionMiddleware inside CacheMiddleware: a visitor with a session
    cookie (the visit counter) sees MISS then HIT on the cached page, and the
    hit sends nothing to the session store."""
    session_spy = RedisSpy()
    session_redis = counting_client(redis_url, session_spy)
    cache = Cache(real_redis, key_prefix=key_prefix)

    async def counter(request: Request) -> Response:
        request.session["visits"] = request.session.get("visits", 0) + 1
        return PlainTextResponse(f"Número de visitas: {request.session['visits']}")

    @cached(ttl=60, tags=["report"], ignores_session=True)
    async def report(request: Request) -> Response:
        return PlainTextResponse("slow report")

    app = Starlette(
        routes=[Route("/", counter), Route("/report", report)],
        middleware=[
            Middleware(CacheMiddleware, cache=cache),
            Middleware(
                SessionMiddleware,
                secret_key="k" * 32,
                redis=session_redis,
                key_prefix=key_prefix + "s:",
            ),
        ],
    )
    async with client_for(app) as client:
        assert (await client.get("/")).text == "Número de visitas: 1"
        assert client.cookies.get("session")
        miss = await client.get("/report")
        session_spy.reset()
        hit = await client.get("/report")
        assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
        assert session_spy.total == 0
        assert (await client.get("/")).text == "Número de visitas: 2"
    await cache.aclose()
    keys = [key async for key in session_redis.scan_iter(match=f"{key_prefix}*")]
    if keys:
        await session_redis.delete(*keys)
    await session_redis.aclose()


async def test_stats_count_hits_misses_bypasses_and_not_stored(harness: Harness) -> None:
    await harness.client.get("/page")
    await harness.client.get("/page")
    await harness.client.get("/page", headers={"authorization": "Basic eA=="})
    await harness.client.get("/echo", params={"h": "set-cookie:a=b"})
    stats = harness.cache.stats
    assert (stats.hits, stats.misses, stats.stores) == (1, 2, 1)
    assert stats.bypass == {"authorization": 1}
    assert stats.not_stored == {"set-cookie": 1}
    assert stats.as_dict()["bypass"] == {"authorization": 1}
    stats.reset()
    assert stats.as_dict()["hits"] == 0


async def test_cached_without_middleware_says_how_to_add_it(framework: Framework) -> None:
    calls = Calls()
    bare = starlette_app(calls, []) if framework == "starlette" else fastapi_app(calls, [])
    async with client_for(bare) as client:
        with pytest.raises(CacheNotConfigured, match=r"add_middleware\(CacheMiddleware"):
            await client.get("/page")
        assert (await client.get("/plain")).text == "plain"  # other routes unaffected


async def test_get_cache_without_middleware_is_a_clear_error() -> None:
    with pytest.raises(CacheNotConfigured, match="CacheMiddleware"):
        get_cache(Request({"type": "http", "headers": []}))


async def test_applying_the_middleware_twice_is_refused(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = Calls()
    inner = build("starlette", cache, calls, session=False)
    app = CacheMiddleware(CacheMiddleware(inner, cache=cache), cache=cache)
    async with client_for(app) as client:
        with pytest.raises(DuplicateMiddleware, match="applied twice"):
            await client.get("/page")


async def test_sub_mounts_and_root_path_are_cached(harness: Harness) -> None:
    miss = await harness.client.get("/sub/page")
    hit = await harness.client.get("/sub/page")
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    # Behind a proxy that strips /prefix (root_path): a separate entry, still cached.
    transport_app = harness.app
    import httpx

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=transport_app, root_path="/prefix"),
        base_url="http://testserver",
    ) as client:
        first = await client.get("/prefix/page")
        second = await client.get("/prefix/page")
    assert first.status_code == 200
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert harness.calls["page"] == 2


async def test_the_route_is_found_behind_a_middleware_that_hides_its_app(
    framework: Framework, real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = Calls()
    app = build(framework, cache, calls, extra=[Middleware(Opaque)])
    async with client_for(app) as client:
        assert (await client.get("/items/5")).headers["x-cache"] == "MISS"
        assert (await client.get("/items/5")).headers["x-cache"] == "HIT"
    await cache.aclose()


async def test_headers_changed_between_start_and_body_are_judged_again(
    real_redis: Redis, key_prefix: str
) -> None:
    """The store rules' verdict on the start message is reused with the body only
    for the same status and headers: a Set-Cookie added to the held start message
    before the body (by an inner middleware) still keeps the answer out."""
    cache = Cache(real_redis, key_prefix=key_prefix)

    @cached(ttl=60)
    async def page(request: Request) -> Response:
        return PlainTextResponse("page")

    class LateCookie:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            start: Message = {}

            async def late_send(message: Message) -> None:
                nonlocal start
                if message["type"] == "http.response.start":
                    start = message
                elif scope["path"] == "/late":
                    start["headers"].append((b"set-cookie", b"late=1"))
                await send(message)

            await self.app(scope, receive, late_send)

    app = Starlette(
        routes=[Route("/late", page), Route("/plain", page)],
        middleware=[Middleware(CacheMiddleware, cache=cache), Middleware(LateCookie)],
    )
    async with client_for(app) as client:
        first, second = await client.get("/late"), await client.get("/late")
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "MISS")
        assert first.headers["x-cache-reason"] == "set-cookie"
        stored, hit = await client.get("/plain"), await client.get("/plain")
        assert (stored.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    await cache.aclose()
