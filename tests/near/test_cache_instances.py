"""Two instances (each its own Cache, client and NearCache, one Redis): what one
of them, or another client of Redis, changes stops the other serving its
local copy, within a generous bound (polled; nothing asserts how fast).

Each body names the handler's call count, shared by both apps, so a copy
served after the change shows the old count."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache, NearCache
from tests.near.cache_app import body, http, make_app, near_ready
from tests.near.conftest import until
from tests.support import DelayProxy, RedisProcess, RedisSpy, counting_client

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]

BOUND = 2.0


@dataclass
class Instance:
    cache: Cache
    near: NearCache
    client: httpx.AsyncClient
    spy: RedisSpy
    redis: Redis

    async def local(self, path: str) -> str:
        """GET ``path`` until it is served with no Redis command; its body."""
        for _ in range(50):
            self.spy.reset()
            text = await body(self.client, path)
            if self.spy.total == 0:
                return text
            await asyncio.sleep(0.01)
        raise AssertionError(f"{path} is never served from the near cache")


@dataclass
class Pair:
    a: Instance
    b: Instance
    calls: Counter[str]


async def instance(url: str, prefix: str, calls: Counter[str], stack: list[Instance]) -> Instance:
    spy = RedisSpy()
    # A long heartbeat: the tracker sends nothing while a test counts commands.
    near = NearCache(heartbeat=60, heartbeat_timeout=5)
    redis = counting_client(url, spy, socket_timeout=5, socket_connect_timeout=5)
    cache = Cache(redis, key_prefix=prefix, timeout=5, near_cache=near)
    client = http(make_app(cache, calls))
    made = Instance(cache, near, client, spy, redis)
    stack.append(made)
    await near_ready(cache)
    return made


async def close(stack: list[Instance]) -> None:
    for made in reversed(stack):
        await made.client.aclose()
        await made.cache.aclose()
        await made.near.aclose()
        await made.redis.aclose()


@pytest.fixture
async def pair(redis_url: str, key_prefix: str) -> AsyncIterator[Pair]:
    calls: Counter[str] = Counter()
    stack: list[Instance] = []
    try:
        yield Pair(
            await instance(redis_url, key_prefix, calls, stack),
            await instance(redis_url, key_prefix, calls, stack),
            calls,
        )
    finally:
        await close(stack)


async def stops_serving(instance: Instance, path: str, old: str) -> str:
    """Poll ``path`` until it is no longer ``old``, within BOUND; the new body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while True:
        text = await body(instance.client, path)
        if text != old:
            return text
        assert loop.time() < deadline, f"{path} still served {old!r} after {BOUND} s"
        await asyncio.sleep(0.02)


async def entry_keys(redis: Redis, prefix: str) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=f"{prefix}*:e:*")]


Change = Callable[[Pair, Redis, str], Awaitable[object]]


async def _del_entry(pair: Pair, redis: Redis, prefix: str) -> None:
    keys = await entry_keys(redis, prefix)
    assert len(keys) == 1
    await redis.delete(*keys)


CHANGES: dict[str, Change] = {
    "tag": lambda pair, redis, prefix: pair.a.cache.invalidate_tags("page"),
    "url": lambda pair, redis, prefix: pair.a.cache.invalidate("http://testserver/page"),
    "namespace": lambda pair, redis, prefix: pair.a.cache.clear(),
    "DEL": _del_entry,
}


@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_change_elsewhere_stops_the_other_instance_serving_its_copy(
    pair: Pair, real_redis: Redis, key_prefix: str, change: str
) -> None:
    assert await body(pair.a.client, "/page") == "page 1"
    assert await pair.b.local("/page") == "page 1"
    assert await pair.a.local("/page") == "page 1"
    await CHANGES[change](pair, real_redis, key_prefix)
    assert await stops_serving(pair.b, "/page", "page 1") == "page 2"
    # A's own change (or the DEL's invalidation) reaches A as well.
    assert await stops_serving(pair.a, "/page", "page 1") == "page 2"
    assert pair.calls["page"] == 2


async def test_a_new_entry_replacing_an_expired_one_reaches_the_other(pair: Pair) -> None:
    assert await body(pair.a.client, "/short") == "short 1"
    assert await pair.b.local("/short") == "short 1"
    # The route's ttl is 1 s: both copies die with the Redis key.
    await asyncio.sleep(1.1)
    assert await body(pair.a.client, "/short") == "short 2"
    # B never serves "short 1" again, and serves A's entry without running
    # the handler (from Redis first, then from memory).
    assert await stops_serving(pair.b, "/short", "short 1") == "short 2"
    assert await pair.b.local("/short") == "short 2"
    assert pair.calls["short"] == 2


async def test_a_key_expiring_in_redis_stops_the_other(
    pair: Pair, real_redis: Redis, key_prefix: str
) -> None:
    assert await body(pair.a.client, "/page") == "page 1"
    (key,) = await entry_keys(real_redis, key_prefix)
    # PEXPIRE invalidates at once; B reads the entry again with its new PTTL,
    # and that copy must die when Redis drops the key, announced or not.
    await real_redis.pexpire(key, 500)
    assert await pair.b.local("/page") == "page 1"
    assert await stops_serving(pair.b, "/page", "page 1") == "page 2"


async def test_flushdb_from_another_client_stops_both(key_prefix: str) -> None:
    server = RedisProcess().start()
    calls: Counter[str] = Counter()
    stack: list[Instance] = []
    raw = Redis.from_url(server.url, socket_timeout=5)
    try:
        a = await instance(server.url, key_prefix, calls, stack)
        b = await instance(server.url, key_prefix, calls, stack)
        pair = Pair(a, b, calls)
        assert await body(a.client, "/page") == "page 1"
        assert await b.local("/page") == "page 1"
        await raw.flushdb()
        assert await stops_serving(pair.b, "/page", "page 1") == "page 2"
    finally:
        await raw.aclose()
        await close(stack)
        server.close()


async def test_an_evicted_entry_stops_the_other(key_prefix: str) -> None:
    server = RedisProcess().start()
    calls: Counter[str] = Counter()
    stack: list[Instance] = []
    raw = Redis.from_url(server.url, socket_timeout=5)
    try:
        await raw.config_set("maxmemory", "4mb")
        await raw.config_set("maxmemory-policy", "allkeys-lru")
        a = await instance(server.url, key_prefix, calls, stack)
        b = await instance(server.url, key_prefix, calls, stack)
        assert await body(a.client, "/page") == "page 1"
        assert await b.local("/page") == "page 1"
        (key,) = await entry_keys(raw, key_prefix)
        filler = b"x" * 10_000
        for n in range(10_000):
            await raw.set(f"fill:{n}", filler)  # outside the tracked prefix
            if n % 50 == 0 and not await raw.exists(key):
                break
        assert not await raw.exists(key), "the entry was never evicted"
        assert await stops_serving(b, "/page", "page 1") != "page 1"
    finally:
        await raw.aclose()
        await close(stack)
        server.close()


@pytest.mark.parametrize("change", ["tag", "DEL"])
async def test_a_reply_overtaken_by_a_change_is_not_kept(
    key_prefix: str, real_redis: Redis, redis_url: str, change: str
) -> None:
    """B's lookup reply is held back by a proxy while A changes the entry: the
    change's invalidation reaches B's tracker first (its link is not delayed
    then), so the held reply (the old entry) must not be kept."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    calls: Counter[str] = Counter()
    stack: list[Instance] = []
    async with DelayProxy(port) as proxy:
        try:
            a = await instance(redis_url, key_prefix, calls, stack)
            b = await instance(proxy.url, key_prefix, calls, stack)
            pair = Pair(a, b, calls)
            assert await body(a.client, "/page") == "page 1"
            stats = b.near.stats
            # The invalidations of A's store come in on B's tracker link; once
            # they are in, the tracker gets nothing (60 s heartbeat, no
            # writes): the next reply chunk through the proxy is B's lookup.
            await asyncio.sleep(0.3)
            # Its pooled connection is open (no handshake reply to mistake).
            await b.redis.ping()
            invalidations, refused = stats.invalidations, stats.refused
            replies = proxy.chunks["replies"]
            proxy.latency = 1.0
            request = asyncio.create_task(body(b.client, "/page"))
            await proxy.until_chunks("replies", replies + 1)
            proxy.latency = 0.0
            await CHANGES[change](pair, real_redis, key_prefix)
            await until(lambda: stats.invalidations > invalidations, 5)
            assert not request.done(), "the reply came before the invalidation"
            # Read before the change: this request may show the old entry.
            assert await request == "page 1"
            assert stats.refused > refused
            assert await body(b.client, "/page") == "page 2"
        finally:
            await close(stack)
