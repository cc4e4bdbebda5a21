"""Attacks on the response cache's near layer (``cache._near_layer``): each
test tries to make a lookup answered from process memory serve what Redis
would no longer serve (a page invalidated elsewhere, another deployment's
keys, ...). Real Redis throughout; every test is bounded."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel

from asgi_redis_kit import Cache, NearCache
from asgi_redis_kit.cache._entry import Entry, content_etag, encode
from asgi_redis_kit.cache._keys import CacheKey
from tests.near.cache_app import near_ready
from tests.scaleout.servers import SentinelDeployment
from tests.support import http_scope

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


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


def entry(body: bytes, versions: tuple[int, ...]) -> bytes:
    return encode(
        Entry(
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
    )


async def stored_and_kept(cache: Cache, key: CacheKey, body: bytes) -> None:
    """Store ``body`` under ``key``, then look it up until memory answers."""
    found = await cache.lookup(key, lease=True)
    assert found.entry is None
    await cache.store(key, entry(body, found.versions), 60, found.token)
    for _ in range(200):
        hits = cache.stats.near_hits
        found = await cache.lookup(key)
        assert found.entry is not None
        assert found.entry.body == body
        if cache.stats.near_hits > hits:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the entry is never answered from memory")


@pytest.mark.timeout(120)
@pytest.mark.xfail(
    strict=True,
    reason="near._near identifies a Sentinel domain by service name, db and user only: "
    "two deployments named alike share one domain, tracked on the first one's master",
)
async def test_two_sentinel_deployments_with_one_service_name_are_not_one_server(
    key_prefix: str,
) -> None:
    """A session store on one Sentinel-managed Redis and the cache on another,
    both named ``mymaster`` (Sentinel's default) and sharing one NearCache: the
    cache's copies must be invalidated by writes on *its* master."""
    first = await asyncio.to_thread(SentinelDeployment, "mymaster")
    try:
        second = await asyncio.to_thread(SentinelDeployment, "mymaster")
    except BaseException:
        first.close()
        raise
    sentinels = [
        Sentinel(d.sentinel_addresses, socket_timeout=2, socket_connect_timeout=2)  # type: ignore[no-untyped-call]
        for d in (first, second)
    ]
    sessions_redis, cache_redis = (s.master_for("mymaster", socket_timeout=2) for s in sentinels)
    near = NearCache(heartbeat=0.2, heartbeat_timeout=1)
    cache = Cache(cache_redis, key_prefix=key_prefix + "c:", timeout=2, near_cache=near)
    other = Redis(host="127.0.0.1", port=second.master_port(), socket_timeout=2)
    try:
        # The session store's view (it makes it on its first load).
        near.view(sessions_redis, key_prefix + "s:")
        await near_ready(cache)
        key = page_key(cache)
        await stored_and_kept(cache, key, b"one")
        # Another instance invalidates the tag on the cache's own Redis.
        await other.incr(key.tag_versions[0])
        await asyncio.sleep(1.0)  # far more than any invalidation's delivery
        found = await cache.lookup(key)
        assert found.entry is None, "served a page invalidated on the cache's own Redis"
    finally:
        await cache.aclose()
        await near.aclose()
        await other.aclose()
        for client in (sessions_redis, cache_redis):
            await client.aclose()
        for sentinel in sentinels:
            await sentinel.aclose()
        await asyncio.to_thread(first.close)
        await asyncio.to_thread(second.close)
