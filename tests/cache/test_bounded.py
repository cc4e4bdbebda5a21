"""Behaviour 9: size bounds, streaming pass-through, expiry and jitter on a real Redis
(checklist 26, 28, 29)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from asgi_redis_kit import Cache, CacheMiddleware, cached
from asgi_redis_kit.cache._entry import decode
from tests.cache.conftest import client_for
from tests.support import http_scope

pytestmark = pytest.mark.real_redis


def _app(cache: Cache, *routes: Route, inner: list[Middleware] | None = None) -> Starlette:
    return Starlette(
        routes=list(routes), middleware=[Middleware(CacheMiddleware, cache=cache), *(inner or [])]
    )


async def test_entries_expire_at_ttl_plus_jitter_on_real_redis(
    real_redis: Redis, key_prefix: str
) -> None:
    @cached(ttl=60, jitter=30)
    async def spread(request: Request) -> Response:
        return PlainTextResponse("x" * 10)

    @cached(ttl=1, jitter=0.5)
    async def short(request: Request) -> Response:
        return PlainTextResponse("y" * 10)

    async def entry_keys() -> set[bytes]:
        return {k async for k in real_redis.scan_iter(match=f"{key_prefix}*:e:*")}

    cache = Cache(real_redis, key_prefix=key_prefix)
    async with client_for(_app(cache, Route("/j", spread), Route("/s", short))) as client:
        # Jitter, on entries that outlive the test: checking 20 of them takes no
        # race against their expiry, however slow the machine.
        for n in range(20):
            assert (await client.get(f"/j?n={n}")).headers["x-cache"] == "MISS"
        keys = await entry_keys()
        assert len(keys) == 20
        lifetimes = set()
        for key in keys:
            raw = await real_redis.get(key)
            assert isinstance(raw, bytes)
            entry = decode(raw)
            assert entry is not None
            assert 60 <= entry.fresh_for <= 90
            lifetimes.add(entry.fresh_for)
            assert 0 < await real_redis.pttl(key) <= 90_000
        assert len(lifetimes) > 1  # jitter spreads expiry
        # Expiry, on one short entry (1 to 1.5 s).
        assert (await client.get("/s")).headers["x-cache"] == "MISS"
        (short_key,) = await entry_keys() - keys
        assert (await client.get("/s")).headers["x-cache"] == "HIT"
        assert 0 < await real_redis.pttl(short_key) <= 1500
        await asyncio.sleep(1.6)
        # Never served after expiry: gone from Redis, and a miss.
        assert short_key not in await entry_keys()
        assert (await client.get("/s")).headers["x-cache"] == "MISS"
    await cache.aclose()


async def test_cache_busting_queries_leave_no_immortal_keys(
    real_redis: Redis, key_prefix: str
) -> None:
    @cached(ttl=30, max_size=64)
    async def page(request: Request) -> Response:
        return PlainTextResponse("small")

    # A generous deadline: a lookup or store that misses it fails open and leaves
    # no entry, and 50 concurrent requests on one event loop can delay a reply past
    # the default 0.5 s on a loaded machine.
    cache = Cache(real_redis, key_prefix=key_prefix, max_lifetime=60, timeout=5)
    async with client_for(_app(cache, Route("/p", page))) as client:
        for batch in range(20):
            await asyncio.gather(*(client.get(f"/p?bust={batch}-{n}") for n in range(50)))
    keys = [k async for k in real_redis.scan_iter(match=f"{key_prefix}*", count=1000)]
    assert len(keys) == 1000  # one entry each, no lock or bookkeeping left behind
    pipe = real_redis.pipeline(transaction=False)
    for key in keys:
        pipe.pttl(key)
    ttls = await pipe.execute()
    assert all(0 < ttl <= 30_000 for ttl in ttls)
    await cache.aclose()


async def test_streaming_passes_through_unbuffered(real_redis: Redis, key_prefix: str) -> None:
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first "
        await release.wait()
        yield b"second"

    @cached(ttl=60)
    async def stream(request: Request) -> Response:
        return StreamingResponse(body())

    cache = Cache(real_redis, key_prefix=key_prefix)
    app = _app(cache, Route("/stream", stream))
    received: list[Message] = []
    first_chunk = asyncio.Event()

    async def send(message: Message) -> None:
        received.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    async def receive() -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    scope = http_scope("/stream")
    task = asyncio.create_task(app(scope, receive, send))
    # The first chunk reaches the client while the app still holds the second.
    async with asyncio.timeout(10):
        await first_chunk.wait()
    assert not release.is_set()
    start = received[0]
    assert start["type"] == "http.response.start"
    assert (b"x-cache-reason", b"streaming") in start["headers"]
    release.set()
    async with asyncio.timeout(10):
        await task
    assert b"".join(m.get("body", b"") for m in received[1:]) == b"first second"
    assert cache.stats.not_stored["streaming"] == 1
    await cache.aclose()


async def test_gzip_body_never_reaches_an_identity_client(
    real_redis: Redis, key_prefix: str
) -> None:
    """GZip inside the cache adds ``Vary: Accept-Encoding``: with the header
    declared (``vary=``) or learned from that ``Vary``, each encoding gets its
    own entry (tests/cache/test_vary.py has the rest)."""

    @cached(ttl=60, vary=["accept-encoding"])
    async def keyed(request: Request) -> Response:
        return PlainTextResponse("z" * 2000)

    @cached(ttl=60)
    async def unkeyed(request: Request) -> Response:
        return PlainTextResponse("z" * 2000)

    cache = Cache(real_redis, key_prefix=key_prefix)
    app = _app(
        cache,
        Route("/keyed", keyed),
        Route("/unkeyed", unkeyed),
        inner=[Middleware(GZipMiddleware, minimum_size=100)],
    )
    gzip, identity = {"accept-encoding": "gzip"}, {"accept-encoding": "identity"}
    async with client_for(app) as client:
        for path in ("/keyed", "/unkeyed"):
            zipped = await client.get(path, headers=gzip)
            assert zipped.headers["content-encoding"] == "gzip"
            plain = await client.get(path, headers=identity)
            assert "content-encoding" not in plain.headers
            assert plain.text == "z" * 2000
            again = await client.get(path, headers=identity)
            assert "content-encoding" not in again.headers
        for path in ("/keyed", "/unkeyed"):
            zipped_again = await client.get(path, headers=gzip)
            assert zipped_again.headers["x-cache"] == "HIT"
            assert zipped_again.headers["content-encoding"] == "gzip"
    await cache.aclose()
