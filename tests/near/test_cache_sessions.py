"""A ``vary_on_session`` hit is answered from the near cache like any hit,
when the near cache knows the session's record key (the session store puts
it there when it has a near cache of its own on the same NearCache; here the
test puts it, as that store would) and the session lives on the cache's own
server. A session that is gone (its key deleted) is never proved alive from
memory.

The session store and the cache share one counting client here (same
server: the proof rides in the cache's lookup). Each request's session LOAD
is the session store's one command; the cache's own lookup being answered
from memory shows in ``stats.near_hits`` and ``near_misses`` (the near layer
answers before any I/O) and in the total staying at the session's one."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_redis_kit import Cache, CacheMiddleware, NearCache, SessionMiddleware, cached
from asgi_redis_kit.cache._entry import Entry, content_etag
from asgi_redis_kit.cache._storage import SessionProof
from asgi_redis_kit.near import ABSENT, NearView
from tests.near.cache_app import near_ready
from tests.near.conftest import until
from tests.support import RedisSpy, counting_client, http_scope

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]

SECRET = "near-cache-test-secret-" + "x" * 20


def app(cache: Cache, redis: Redis, prefix: str, calls: Counter[str]) -> Starlette:
    async def login(request: Request) -> Response:
        request.session["user"] = request.query_params["user"]
        return PlainTextResponse("welcome")

    @cached(ttl=60, vary_on_session=True)
    async def mine(request: Request) -> Response:
        calls["mine"] += 1
        return PlainTextResponse(f"{request.session.get('user')} {calls['mine']}")

    return Starlette(
        routes=[Route("/login", login), Route("/mine", mine)],
        middleware=[
            Middleware(SessionMiddleware, secret_key=SECRET, redis=redis, key_prefix=prefix),
            Middleware(CacheMiddleware, cache=cache),
        ],
    )


async def know(view: NearView, redis: Redis, key: str) -> None:
    """What the session store does on a load, for the key alone: kept (its
    value is the session store's business; here a stand-in)."""
    for _ in range(100):
        ticket = view.begin([key])
        try:
            pttl = await redis.pttl(key)
            view.put(ticket, key, "a session record", pttl, 100)
        finally:
            view.end(ticket)
        if view.get(key) is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} is never kept")


@pytest.fixture
async def setup(
    redis_url: str, key_prefix: str
) -> AsyncIterator[tuple[Cache, httpx.AsyncClient, Redis, RedisSpy, NearCache, Counter[str]]]:
    spy = RedisSpy()
    redis = counting_client(redis_url, spy, socket_timeout=5, socket_connect_timeout=5)
    near = NearCache(heartbeat=60, heartbeat_timeout=5)
    cache = Cache(redis, key_prefix=key_prefix + "c:", timeout=5, near_cache=near)
    calls: Counter[str] = Counter()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app(cache, redis, key_prefix + "s:", calls)),
        base_url="http://testserver",
    )
    try:
        yield cache, client, redis, spy, near, calls
    finally:
        await client.aclose()
        await cache.aclose()
        await near.aclose()
        keys = [k async for k in redis.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


async def test_a_per_user_hit_is_answered_from_memory(
    setup: tuple[Cache, httpx.AsyncClient, Redis, RedisSpy, NearCache, Counter[str]],
    key_prefix: str,
) -> None:
    cache, client, redis, spy, near, calls = setup
    assert (await client.get("/login", params={"user": "ann"})).status_code == 200
    records = [
        k.decode()
        async for k in redis.scan_iter(match=f"{key_prefix}s:*")
        if await redis.type(k) == b"hash"
    ]
    assert len(records) == 1, records
    (record,) = records
    sessions = near.view(redis, key_prefix + "s:")
    await until(lambda: sessions.usable, 10)
    await near_ready(cache)
    await know(sessions, redis, record)

    assert (await client.get("/mine")).text == "ann 1"
    for _ in range(50):
        misses = cache.stats.near_misses
        response = await client.get("/mine")
        assert response.text == "ann 1"
        if cache.stats.near_misses == misses:
            break
    hits, misses = cache.stats.near_hits, cache.stats.near_misses
    for _ in range(5):
        spy.reset()
        response = await client.get("/mine")
        assert (response.headers["x-cache"], response.text) == ("HIT", "ann 1")
        assert spy.total <= 1, spy.commands  # the session store's LOAD, if any
    assert cache.stats.near_hits == hits + 5
    assert cache.stats.near_misses == misses
    assert calls["mine"] == 1


async def test_a_gone_session_is_never_proved_alive_from_memory(
    setup: tuple[Cache, httpx.AsyncClient, Redis, RedisSpy, NearCache, Counter[str]],
    key_prefix: str,
) -> None:
    cache, _, redis, _, near, _ = setup
    record = f"{key_prefix}s:someone"
    await redis.hset(record, "data", "{}")
    key = cache.keys.for_request(
        http_scope("/mine", headers=[(b"host", b"testserver"), (b"cookie", b"session=abc")]),
        namespace=cache.namespace,
        host="testserver",
        vary=(),
        session_cookie_name="session",
        vary_on_session=True,
        tags=(),
        custom=None,
        session=b"someone",
    )
    proof = SessionProof(record)
    sessions = near.view(redis, key_prefix + "s:")
    await until(lambda: sessions.usable, 10)
    await near_ready(cache)
    found = await cache.lookup(key, lease=True, session=proof)
    body = b"ann's page"
    await cache.store(key, _entry(body, found.versions), found.token)
    await know(sessions, redis, record)
    for _ in range(50):
        hits = cache.stats.near_hits
        found = await cache.lookup(key, session=proof)
        assert found.entry is not None
        assert found.entry.body == body
        if cache.stats.near_hits > hits:
            break
    assert cache.stats.near_hits > hits, "never answered from memory"

    # Deleted: the copy goes, and the lookup proves it gone in Redis.
    await redis.delete(record)
    await until(lambda: sessions.get(record) is None, 2)
    found = await cache.lookup(key, session=proof)
    assert (found.entry, found.session_gone) == (None, True)

    # Known missing here (as the session store keeps a missing record):
    # gone, from memory.
    ticket = sessions.begin([record])
    sessions.put(ticket, record, ABSENT, -2, 0)
    sessions.end(ticket)
    hits = cache.stats.near_hits
    found = await cache.lookup(key, session=proof)
    assert (found.entry, found.session_gone) == (None, True)
    assert cache.stats.near_hits == hits + 1


def _entry(body: bytes, versions: tuple[int, ...]) -> Entry:
    return Entry(
        status=200,
        headers=(),
        body=body,
        etag=content_etag(body),
        stored_at=time.time(),
        fresh_for=60,
        stale_while_revalidate=0,
        stale_if_error=0,
        versions=versions,
        per_user=True,
    )
