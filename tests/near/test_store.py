"""The memory bound, the per-entry limit, what put() accepts, and the arguments."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from asgi_redis_kit.near import ABSENT, NearCache, NearView
from asgi_redis_kit.near._store import ENTRY_OVERHEAD
from tests.near.conftest import HEARTBEAT, HEARTBEAT_TIMEOUT, usable

pytestmark = pytest.mark.real_redis


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url, socket_timeout=5)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def small() -> AsyncIterator[NearCache]:
    cache = NearCache(
        max_bytes=10_000,
        max_entry_bytes=3_000,
        heartbeat=HEARTBEAT,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
    )
    try:
        yield cache
    finally:
        await cache.aclose()


def store(view: NearView, key: str, value: object, size: int, pttl_ms: int = -1) -> None:
    ticket = view.begin([key])
    assert ticket is not None
    try:
        view.put(ticket, key, value, pttl_ms, size)
    finally:
        view.end(ticket)


async def test_the_byte_bound_evicts_the_least_recently_used(
    small: NearCache, client: Redis, key_prefix: str
) -> None:
    view = await usable(small.view(client, key_prefix))
    keys = [f"{key_prefix}{i}" for i in range(20)]
    store(view, keys[0], b"first", 2_000)
    for key in keys[1:]:
        assert view.get(keys[0]) is not None  # recently used: survives
        store(view, key, b"x", 2_000)
        assert small.stats.bytes <= 10_000
    assert small.stats.evictions > 0
    assert view.get(keys[0]) is not None
    assert view.get(keys[-1]) is not None
    assert view.get(keys[1]) is None  # the oldest untouched went first
    per_entry = 2_000 + len(keys[0]) + ENTRY_OVERHEAD
    assert small.stats.entries == 10_000 // per_entry


async def test_an_entry_above_max_entry_bytes_is_not_kept(
    small: NearCache, client: Redis, key_prefix: str
) -> None:
    view = await usable(small.view(client, key_prefix))
    key = f"{key_prefix}big"
    store(view, key, b"small", 10)
    store(view, key, b"big", 3_001)
    assert view.get(key) is None  # not even the older copy
    assert small.stats.refused == 1
    store(view, key, b"fits", 3_000)
    hit = view.get(key)
    assert hit is not None
    assert hit.value == b"fits"


async def test_put_follows_pttl(near: NearCache, client: Redis, key_prefix: str) -> None:
    view = await usable(near.view(client, key_prefix))
    store(view, f"{key_prefix}missing", b"ignored", 7, pttl_ms=-2)
    hit = view.get(f"{key_prefix}missing")
    assert hit is not None
    assert hit.value is ABSENT
    store(view, f"{key_prefix}ttl", b"v", 1, pttl_ms=1500)
    hit = view.get(f"{key_prefix}ttl")
    assert hit is not None
    assert 1000 < hit.remaining_ms <= 1500
    store(view, f"{key_prefix}zero", b"v", 1, pttl_ms=0)
    assert view.get(f"{key_prefix}zero") is None


async def test_a_copy_ends_a_millisecond_before_the_pttl_it_read(
    near: NearCache, client: Redis, key_prefix: str
) -> None:
    """Redis counts a PTTL from the start of its current millisecond, so up to
    1 ms of it may be gone already: a copy kept for the whole PTTL could be
    served after Redis dropped the key."""
    view = await usable(near.view(client, key_prefix))
    key = f"{key_prefix}ttl"
    ticket = view.begin([key])
    assert ticket is not None
    view.put(ticket, key, b"v", 1500, 1)
    view.end(ticket)
    hit = view.get(key)
    assert hit is not None
    assert hit.expires_at <= ticket.started + 1.499
    store(view, f"{key_prefix}one", b"v", 1, pttl_ms=1)  # nothing surely left
    assert view.get(f"{key_prefix}one") is None


async def test_a_ticket_is_good_for_one_read_and_end_releases_it(
    near: NearCache, client: Redis, key_prefix: str
) -> None:
    view = await usable(near.view(client, key_prefix))
    key = f"{key_prefix}k"
    old = view.begin([key])
    view.end(old)
    view.put(old, key, b"late", -1, 4)  # after end(): nothing to put
    assert view.get(key) is None
    # Two reads of one key: an invalidation refuses both, and the pending state
    # goes only when the second ends.
    first, second = view.begin([key]), view.begin([key, key])
    view.invalidate([key])
    view.end(first)
    assert second is not None
    view.put(second, key, b"stale", -1, 5)
    view.end(second)
    assert view.get(key) is None
    third = view.begin([key])
    view.put(third, key, b"fresh", -1, 5)
    view.end(third)
    assert view.get(key) is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_bytes": 0},
        {"max_bytes": -1},
        {"max_bytes": 1.5},
        {"max_bytes": True},
        {"max_entry_bytes": 0},
        {"max_bytes": 100, "max_entry_bytes": 101},
        {"max_ttl": 0},
        {"max_ttl": float("inf")},
        {"max_ttl": float("nan")},
        {"heartbeat": -1},
        {"heartbeat_timeout": 0},
        {"heartbeat": "1"},
    ],
)
def test_bad_arguments_are_a_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        NearCache(**kwargs)


async def test_view_wants_an_async_client_and_a_str_prefix(near: NearCache) -> None:
    import redis

    with pytest.raises(TypeError):
        near.view(redis.Redis(), "p:")  # type: ignore[arg-type]
    client = Redis()
    try:
        with pytest.raises(TypeError):
            near.view(client, b"p:")  # type: ignore[arg-type]
    finally:
        await client.aclose()


def test_view_needs_a_running_loop(near: NearCache) -> None:
    with pytest.raises(RuntimeError):
        near.view(Redis(), "p:")


def test_shared_is_one_instance() -> None:
    assert NearCache.shared() is NearCache.shared()
    assert isinstance(NearCache.shared(), NearCache)


async def test_stats_as_dict(near: NearCache, client: Redis, key_prefix: str) -> None:
    view = await usable(near.view(client, key_prefix))
    store(view, f"{key_prefix}a", b"a", 1)
    view.get(f"{key_prefix}a")
    view.get(f"{key_prefix}b")
    stats = near.stats.as_dict()
    assert stats["hits"] == 1
    assert stats["misses"] == 1
    assert stats["stores"] == 1
    assert stats["entries"] == 1
    assert list(stats["tracking"].values()) == ["tracking"]


async def test_prefixes_made_per_request_neither_leak_nor_flush_for_ever(
    near: NearCache, client: Redis, key_prefix: str
) -> None:
    """A prefix with a tenant or user id in it: each new one covered by a
    registered prefix must not be kept for ever (a view each), and each new
    one not covered re-registers and flushes, so past a bound it is refused."""
    view = await usable(near.view(client, key_prefix))
    for i in range(5_000):
        near.view(client, f"{key_prefix}user:{i}:")
    # The one place the views are: how many are kept is the leak.
    assert len(view._domain.views) <= 1_024
    flushes = near.stats.flushes
    refused = 0
    for i in range(1_000):
        # Past the limit a view is made but never usable: its reads go to Redis.
        refused += not near.view(client, f"{key_prefix[:-1]}/other{i}:").usable
    assert refused > 900
    assert near.stats.flushes - flushes <= 64
    assert len(view._domain.prefixes) <= 64


async def test_get_many_answers_every_key_in_order_or_none(
    small: NearCache, client: Redis, key_prefix: str
) -> None:
    view = await usable(small.view(client, key_prefix))
    a, b, c = (f"{key_prefix}{name}" for name in "abc")
    store(view, a, b"one", 10)
    store(view, b, ABSENT, 10, pttl_ms=-2)
    assert view.get_many([a, b]) == [b"one", ABSENT]
    hits, misses = small.stats.hits, small.stats.misses
    assert view.get_many([a, c, b]) is None  # c is not here
    # Counted as get() would have: a hit for a, then the miss that stopped it.
    assert (small.stats.hits, small.stats.misses) == (hits + 1, misses + 1)
    view.invalidate([a])
    assert view.get_many([a, b]) is None


async def test_a_view_is_closed_once_its_cache_is(client: Redis, key_prefix: str) -> None:
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    view = await usable(near.view(client, key_prefix))
    assert not view.closed
    assert near.view(client, key_prefix) is view
    await near.aclose()
    assert view.closed
    fresh = near.view(client, key_prefix)
    try:
        assert fresh is not view
        assert not fresh.closed
    finally:
        await near.aclose()
