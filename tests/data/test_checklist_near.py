"""Checklist 47 and 48 on the data cache with the near cache (``get`` and
``@cache.memoize``; tests/near/test_cache_instances.py, test_race.py and
test_cache_writes.py are the response cache's versions):

* 47: a change made by another instance (set, delete, invalidate_tags, clear)
  or by another Redis client (DEL, PEXPIRE, FLUSHDB) stops the first instance
  serving its local copy within the documented bound (``BOUND``, polled);
  a change made by the instance itself is seen by its very next call, even
  while Redis's invalidation of it is still on its way;
* 48: a lookup reply produced before a concurrent write, and held back by a
  DelayProxy until the write's invalidation has arrived, is never kept.

Each instance has its own client, NearCache and command spy, on a throwaway
server (FLUSHDB is allowed there)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache, NearCache
from asgi_redis_kit.cache._memo import Memoized
from tests.near.cache_app import near_ready
from tests.near.conftest import until
from tests.near.test_cache_writes import tracker_through
from tests.support import DelayProxy, RedisProcess, RedisSpy, counting_client

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]

# The documented worst case for an instance to stop serving a changed value:
# heartbeat + heartbeat_timeout at their defaults (docs/near-cache.md); an
# invalidation normally arrives within milliseconds.
BOUND = 2.0
PREFIX = "nc:"


@dataclass
class Instance:
    cache: Cache
    near: NearCache
    spy: RedisSpy
    redis: Redis
    runs: list[int]  # shared by the instances of one test
    memo: Memoized[[], int] = field(init=False)

    def __post_init__(self) -> None:
        runs = self.runs

        @self.cache.memoize(ttl=60, key="memo", tags=["t"])
        async def memo() -> int:
            # The shared count of runs of both instances' memo() (see ``pair``).
            runs.append(len(runs) + 1)
            return len(runs)

        self.memo = memo

    async def local(self, read: Callable[[], Awaitable[object]]) -> object:
        """``read()`` until it sends no Redis command (served from memory)."""
        for _ in range(100):
            self.spy.reset()
            value = await read()
            if self.spy.total == 0:
                return value
            await asyncio.sleep(0.01)
        raise AssertionError("never served from the near cache")

    async def aclose(self) -> None:
        await self.cache.aclose()
        await self.near.aclose()
        await self.redis.aclose()


async def instance(url: str, runs: list[int], stack: list[Instance]) -> Instance:
    spy = RedisSpy()
    # A long heartbeat: the tracker sends nothing while a test counts commands.
    near = NearCache(heartbeat=60, heartbeat_timeout=5)
    redis = counting_client(url, spy, socket_timeout=5, socket_connect_timeout=5)
    cache = Cache(redis, key_prefix=PREFIX, timeout=5, near_cache=near)
    made = Instance(cache, near, spy, redis, runs)
    stack.append(made)
    await near_ready(made.cache)
    return made


@dataclass
class Pair:
    a: Instance
    b: Instance
    raw: Redis
    runs: list[int]


@pytest.fixture
async def pair(own_redis: RedisProcess) -> AsyncIterator[Pair]:
    runs: list[int] = []
    stack: list[Instance] = []
    raw = Redis.from_url(own_redis.url, socket_timeout=5)
    try:
        yield Pair(
            await instance(own_redis.url, runs, stack),
            await instance(own_redis.url, runs, stack),
            raw,
            runs,
        )
    finally:
        for made in reversed(stack):
            await made.aclose()
        await raw.aclose()


async def stops_serving(read: Callable[[], Awaitable[object]], old: object) -> object:
    """Poll ``read()`` until it is no longer ``old``, within BOUND; the new value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while (value := await read()) == old:
        assert loop.time() < deadline, f"still {old!r} after {BOUND} s"
        await asyncio.sleep(0.01)
    return value


Change = Callable[[Pair, str], Awaitable[object]]


async def _pexpire(pair: Pair, key: str) -> None:
    await pair.raw.pexpire(pair.a.cache.value_key(key).entry, 300)


CHANGES: dict[str, Change] = {
    "set": lambda pair, key: pair.a.cache.set(key, "written by a", ttl=60),
    "delete": lambda pair, key: pair.a.cache.delete(key),
    "invalidate_tags": lambda pair, key: pair.a.cache.invalidate_tags("t"),
    "clear": lambda pair, key: pair.a.cache.clear(),
    "DEL": lambda pair, key: pair.raw.delete(pair.a.cache.value_key(key).entry),
    "PEXPIRE": _pexpire,
    "FLUSHDB": lambda pair, key: pair.raw.flushdb(),
}


@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_change_elsewhere_stops_the_other_instance_serving_get(
    pair: Pair, change: str
) -> None:
    await pair.a.cache.set("k", "old", ttl=60, tags=["t"])
    assert await pair.b.local(lambda: pair.b.cache.get("k")) == "old"
    await CHANGES[change](pair, "k")
    new = await stops_serving(lambda: pair.b.cache.get("k"), "old")
    assert new == ("written by a" if change == "set" else None)


@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_change_elsewhere_stops_the_other_instance_serving_memoize(
    pair: Pair, change: str
) -> None:
    assert await pair.a.memo() == 1
    assert await pair.b.local(pair.b.memo) == 1
    assert await pair.a.local(pair.a.memo) == 1
    await CHANGES[change](pair, "memo")
    # A set() of the memoized key under other tags is a value memo() does not
    # read as its own (it refills); every other change drops the entry.
    assert await stops_serving(pair.b.memo, 1) == 2
    assert await stops_serving(pair.a.memo, 1) == 2
    assert pair.runs == [1, 2]


# -- 48: a reply read before a concurrent write is not kept --------------------------


@pytest.fixture
async def pair_behind_proxy(own_redis: RedisProcess) -> AsyncIterator[tuple[Pair, DelayProxy]]:
    """A direct, B (client and tracker) through a DelayProxy."""
    runs: list[int] = []
    stack: list[Instance] = []
    raw = Redis.from_url(own_redis.url, socket_timeout=5)
    async with DelayProxy(own_redis.port) as proxy:
        try:
            a = await instance(own_redis.url, runs, stack)
            b = await instance(proxy.url, runs, stack)
            yield Pair(a, b, raw, runs), proxy
        finally:
            for made in reversed(stack):
                await made.aclose()
            await raw.aclose()


async def set_v(pair: Pair) -> None:
    await pair.a.cache.set("v", 1, ttl=60)
    # A's read loads the lookup script into Redis: B's held reply is then its
    # lookup's, not a NOSCRIPT whose retry runs after the write.
    assert await pair.a.cache.get("v") == 1


# Each reader: how A stores the value 1, B's read of it, and its data key.
READS: dict[
    str, tuple[Callable[[Pair], Awaitable[object]], Callable[[Instance], Awaitable[object]], str]
] = {
    "get": (set_v, lambda made: made.cache.get("v"), "v"),
    "memoize": (lambda pair: pair.a.memo(), lambda made: made.memo(), "memo"),
}


@pytest.mark.parametrize("write", ["set", "delete", "clear"])
@pytest.mark.parametrize("reader", list(READS))
async def test_a_reply_read_before_a_concurrent_write_is_not_kept(
    pair_behind_proxy: tuple[Pair, DelayProxy], reader: str, write: str
) -> None:
    pair, proxy = pair_behind_proxy
    b = pair.b
    store, read, key = READS[reader]
    await store(pair)
    stats = b.near.stats
    # The invalidations of A's store reach B's tracker; after them the tracker
    # receives nothing (60 s heartbeat, no writes): the next reply chunk
    # through the proxy is B's lookup.
    await asyncio.sleep(0.3)
    await b.redis.ping()  # its pooled connection is open: no handshake to mistake
    invalidations, refused = stats.invalidations, stats.refused
    replies = proxy.chunks["replies"]
    proxy.latency = 1.0
    reading = asyncio.ensure_future(read(b))
    await proxy.until_chunks("replies", replies + 1)  # ran in Redis; reply held
    proxy.latency = 0.0  # what comes next (the invalidation) is not held back
    await CHANGES[write](pair, key)
    await until(lambda: stats.invalidations > invalidations, 5)
    assert not reading.done(), "the reply came before the invalidation"
    assert await reading == 1  # read before the write: this call may show it
    assert stats.refused > refused
    after = await read(b)
    assert after != 1
    # And it stays that way (nothing old was kept to serve from memory).
    for _ in range(5):
        assert await read(b) == after


# -- 47, this instance's own writes: seen at once, before their invalidation ----------


@pytest.fixture
async def slow_tracker(redis_url: str, key_prefix: str) -> AsyncIterator[Cache]:
    """A cache whose tracker hears of every write 0.5 s late (its commands go
    straight to Redis): its own writes must not wait for that."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    async with DelayProxy(port, latency=0.5) as proxy:
        redis = Redis.from_url(
            redis_url, protocol=3, connection_class=tracker_through(proxy.port), socket_timeout=5
        )
        near = NearCache(heartbeat=60, heartbeat_timeout=5)
        made = Cache(redis, key_prefix=key_prefix, timeout=5, near_cache=near)
        try:
            await near_ready(made)
            yield made
        finally:
            await made.aclose()
            await near.aclose()
            await redis.aclose()


async def kept(cache: Cache, read: Callable[[], Awaitable[object]], expected: object) -> None:
    """``read()`` until it is answered from memory, with ``expected``."""
    for _ in range(200):
        hits = cache.stats.near_hits
        assert await read() == expected
        if cache.stats.near_hits > hits:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("never answered from memory")


OWN_WRITES: dict[str, tuple[Callable[[Cache], Awaitable[object]], object]] = {
    "set": (lambda cache: cache.set("k", "new", ttl=60), "new"),
    "delete": (lambda cache: cache.delete("k"), None),
    "invalidate_tags": (lambda cache: cache.invalidate_tags("t"), None),
    "clear": (lambda cache: cache.clear(), None),
}


@pytest.mark.parametrize("write", [*OWN_WRITES, "incr"])
async def test_get_sees_this_instances_own_write_at_once(slow_tracker: Cache, write: str) -> None:
    cache = slow_tracker
    if write == "incr":
        assert await cache.incr("k") == 1
        await kept(cache, lambda: cache.get("k"), 1)
        assert await cache.incr("k") == 2
        assert await cache.get("k") == 2
        return
    await cache.set("k", "old", ttl=60, tags=["t"])
    await kept(cache, lambda: cache.get("k"), "old")
    change, expected = OWN_WRITES[write]
    await change(cache)
    assert await cache.get("k") == expected


@pytest.mark.parametrize("write", ["invalidate", "set", "invalidate_tags", "clear"])
async def test_memoize_sees_this_instances_own_write_at_once(
    slow_tracker: Cache, write: str
) -> None:
    cache = slow_tracker
    runs = 0

    @cache.memoize(ttl=60, key="k", tags=["t"])
    async def memo() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await memo() == 1
    await kept(cache, memo, 1)
    if write == "invalidate":
        assert await memo.invalidate()
    else:
        await OWN_WRITES[write][0](cache)
    assert await memo() == 2
