"""Read-your-writes: a write this cache makes drops its keys from the near
cache before the call returns, so the very next lookup on the same instance
never answers from the copy it replaced, even before Redis's invalidation of
that write has come back.

Redis may deliver that invalidation before the write's own reply, so the
cache's tracker here reaches Redis through a DelayProxy (its invalidations
come 0.5 s late) while its commands go straight to Redis: a write that did
not drop its keys itself would leave the old copy served meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from asgi_redis_kit import Cache, NearCache
from asgi_redis_kit.cache._entry import Entry, content_etag
from asgi_redis_kit.cache._keys import CacheKey
from tests.near.cache_app import layer, near_ready
from tests.support import DelayProxy, http_scope

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


def tracker_through(proxy_port: int) -> type[Connection]:
    """A connection class whose tracker connection (the near cache makes it
    with ``protocol=2``; the client's own use RESP3) goes to ``proxy_port``."""

    class Split(Connection):
        def __init__(self, **kwargs: Any) -> None:
            if kwargs.get("protocol") == 2:
                kwargs["port"] = proxy_port
            super().__init__(**kwargs)

    return Split


@pytest.fixture
async def cache(redis_url: str, key_prefix: str) -> AsyncIterator[Cache]:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    async with DelayProxy(port, latency=0.5) as proxy:
        redis = Redis.from_url(
            redis_url,
            protocol=3,
            connection_class=tracker_through(proxy.port),
            socket_timeout=5,
        )
        near = NearCache(heartbeat=60, heartbeat_timeout=5)
        made = Cache(redis, key_prefix=key_prefix, timeout=5, near_cache=near)
        try:
            await near_ready(made)
            assert proxy.accepted == 2  # the tracker and its SWAPDB probe, and only they
            yield made
        finally:
            await made.aclose()
            await near.aclose()
            await redis.aclose()


def page_key(cache: Cache, path: str = "/page") -> CacheKey:
    return cache.keys.for_request(
        http_scope(path),
        namespace=cache.namespace,
        host="testserver",
        vary=(),
        session_cookie_name="session",
        vary_on_session=False,
        tags=("page",),
        custom=None,
    )


def entry(body: bytes, versions: tuple[int, ...]) -> Entry:
    return Entry(
        status=200,
        headers=((b"content-type", b"text/plain"),),
        body=body,
        etag=content_etag(body),
        stored_at=time.time(),
        fresh_for=60,
        stale_while_revalidate=0,
        stale_if_error=0,
        versions=versions,
        per_user=False,
    )


async def kept(cache: Cache, key: CacheKey, body: bytes) -> None:
    """Look ``key`` up until it is answered from memory with ``body`` (a read
    overtaken by the late invalidation of our own store is not kept)."""
    for _ in range(200):
        hits = cache.stats.near_hits
        found = await cache.lookup(key)
        assert found.entry is not None
        assert found.entry.body == body
        if cache.stats.near_hits > hits:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the entry is never answered from memory")


async def stored(cache: Cache, key: CacheKey, body: bytes) -> None:
    found = await cache.lookup(key, lease=True)
    assert found.entry is None
    await cache.store(key, entry(body, found.versions), found.token)


async def test_a_store_replacing_a_kept_entry_is_read_back_at_once(cache: Cache) -> None:
    key = page_key(cache)
    await stored(cache, key, b"one")
    await kept(cache, key, b"one")
    versions = (await cache.lookup(key)).versions
    await cache.store(key, entry(b"two", versions), None)
    found = await cache.lookup(key)
    assert found.entry is not None
    assert found.entry.body == b"two"


Write = Callable[[Cache], Awaitable[object]]
WRITES: dict[str, Write] = {
    "invalidate_tags": lambda cache: cache.invalidate_tags("page"),
    "invalidate": lambda cache: cache.invalidate("http://testserver/page"),
    "clear": lambda cache: cache.clear(),
}


@pytest.mark.parametrize("write", list(WRITES))
async def test_an_invalidation_is_seen_by_the_next_lookup(cache: Cache, write: str) -> None:
    key = page_key(cache)
    await stored(cache, key, b"one")
    await kept(cache, key, b"one")
    hits = cache.stats.near_hits
    await WRITES[write](cache)
    found = await cache.lookup(key)
    assert found.entry is None
    assert cache.stats.near_hits == hits


async def test_writes_that_raise_still_drop_the_keys(cache: Cache) -> None:
    """A write whose reply is lost may have reached Redis: its keys are
    dropped all the same (here: the breaker is open, nothing was sent)."""
    key = page_key(cache)
    await stored(cache, key, b"one")
    await kept(cache, key, b"one")
    view = layer(cache).view()
    assert view.get(key.generation) is not None
    for _ in range(10):
        cache.breaker.failure()
    with pytest.raises(Exception, match="breaker"):
        await cache.clear()
    assert view.get(key.generation) is None
