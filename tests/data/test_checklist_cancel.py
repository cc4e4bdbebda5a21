"""Checklist 34 on the data cache (the CVE-2023-28859 regression): get,
get_many, set, set_many, incr and memoized calls abandoned mid-reply behind a
DelayProxy leave every later call its own key's value.

As tests/test_cancellation.py does for the raw backend, sessions and cached
pages (whose helpers it uses): every reply is held back by the proxy while the
callers give up, at the cache's deadline (``deadline``) or by ``task.cancel()``
(``cancel``); then each of ``N`` keys is read back by its own caller. A
connection handed back to the pool with a reply still on its way would answer
the next command with it: ``get("k7")`` returning k3's value, an ``incr`` of one
counter returning another's, a memoized call another argument's result."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import BackendUnavailable, Cache
from tests.support import DelayProxy
from tests.test_cancellation import HANG, POOL, RETRIES, Mode, abandon, all_closed, check_pool

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]

N = 200
CHUNK = 10  # keys per get_many call
MISS = object()


@pytest.fixture
async def cache(proxy: DelayProxy) -> AsyncIterator[Cache]:
    made = Cache(
        proxy.url,
        key_prefix="cx:",
        # Generous while seeding and reading back; abandon() lowers it.
        timeout=HANG,
        max_connections=POOL,
        # Never stop asking Redis: every call below goes through the pool.
        breaker_threshold=10**9,
    )
    try:
        yield made
    finally:
        await made.aclose()


@dataclass
class Case:
    """One operation under test: ``seed`` before the latency, the ``calls`` to
    abandon, what each abandoned call may end with in deadline mode, and a
    ``check`` of key ``i`` afterwards ('' when right, None when Redis did not
    answer, else what was wrong)."""

    seed: Callable[[], Awaitable[None]]
    calls: Callable[[], list[Awaitable[Any]]]
    on_deadline: Callable[[int, Any], bool]
    check: Callable[[int], Awaitable[str | None]]


def key(i: int) -> str:
    return f"k{i}"


def cases(cache: Cache) -> dict[str, Case]:
    values = {key(i): f"value-{i}-{uuid.uuid4().hex}" for i in range(N)}
    newer = {key(i): f"newer-{i}-{uuid.uuid4().hex}" for i in range(N)}
    ran: list[int] = []

    @cache.memoize(ttl=300)
    async def f(i: int) -> str:
        ran.append(i)
        return values[key(i)]

    async def seed_values() -> None:
        await cache.set_many(values, ttl=300)

    def verdict(i: int, got: Any, right: tuple[Any, ...]) -> str | None:
        if got is MISS:
            return None
        return "" if got in right else f"{key(i)}: {got!r}"

    async def own_value(i: int) -> str | None:
        return verdict(i, await cache.get(key(i), MISS), (values[key(i)],))

    async def set_or_not(i: int) -> str | None:
        # The abandoned SET ran in Redis (only its reply was held back), or not.
        return verdict(i, await cache.get(key(i), MISS), (values[key(i)], newer[key(i)]))

    async def seed_counters() -> None:
        for i in range(N):
            await cache.incr(key(i), (i + 1) * 1000, ttl=300)

    async def own_counter(i: int) -> str | None:
        got = await cache.incr(key(i))
        if got - (i + 1) * 1000 not in (1, 2) or await cache.get(key(i)) != got:
            return f"{key(i)}: {got!r}"
        return ""

    async def seed_memo() -> None:
        for i in range(N):
            await f(i)
        ran.clear()

    async def own_result(i: int) -> str | None:
        got = await f(i)
        return "" if got == values[key(i)] else f"f({i}): {got!r}"

    def chunks() -> list[list[str]]:
        return [[key(i) for i in range(s, s + CHUNK)] for s in range(0, N, CHUNK)]

    return {
        "get": Case(
            seed_values,
            lambda: [cache.get(key(i), MISS) for i in range(N)],
            lambda i, got: got is MISS,  # fail open
            own_value,
        ),
        "get_many": Case(
            seed_values,
            lambda: [cache.get_many(keys, MISS) for keys in chunks()],
            lambda i, got: got == [MISS] * CHUNK,
            own_value,
        ),
        "set": Case(
            seed_values,
            lambda: [cache.set(key(i), newer[key(i)], ttl=300) for i in range(N)],
            lambda i, got: isinstance(got, BackendUnavailable),
            set_or_not,
        ),
        "set_many": Case(
            seed_values,
            lambda: [cache.set_many({k: newer[k] for k in keys}, ttl=300) for keys in chunks()],
            lambda i, got: isinstance(got, BackendUnavailable),
            set_or_not,
        ),
        "incr": Case(
            seed_counters,
            lambda: [cache.incr(key(i)) for i in range(N)],
            lambda i, got: isinstance(got, BackendUnavailable),
            own_counter,
        ),
        # Fail open: the function runs, and returns this call's own value.
        "memoize": Case(
            seed_memo,
            lambda: [f(i) for i in range(N)],
            lambda i, got: got == values[key(i)],
            own_result,
        ),
    }


async def retried(check: Callable[[int], Awaitable[str | None]], i: int) -> str:
    """``check(i)``, again while Redis was unavailable (a loaded machine): wrong
    answers are what this is about."""
    for _ in range(RETRIES):
        try:
            found = await check(i)
        except BackendUnavailable:
            continue
        if found is not None:
            return found
    return f"{key(i)}: unavailable every time"


@pytest.mark.parametrize("mode", ["deadline", "cancel"])
@pytest.mark.parametrize("op", ["get", "get_many", "set", "set_many", "incr", "memoize"])
async def test_data_calls_abandoned_mid_reply_leave_every_key_its_own_value(
    cache: Cache, proxy: DelayProxy, admin: Redis, op: str, mode: Mode
) -> None:
    case = cases(cache)[op]
    async with asyncio.timeout(HANG):
        await case.seed()
        # Open the pool's connections before any latency: the callers below are
        # then abandoned reading replies, not handshakes.
        await asyncio.gather(*(cache.get(key(i)) for i in range(3 * POOL)))
    calls = case.calls()
    results = await abandon(proxy, cache.backend, mode, calls)
    # Cancelled, or (every call in deadline mode; in cancel mode those still
    # queued for a connection, which may give up on it first) ended as the
    # failure policy says: never with a value of another key.
    wrong = [
        (i, r)
        for i, r in enumerate(results)
        if not (mode == "cancel" and isinstance(r, asyncio.CancelledError))
        and not case.on_deadline(i, r)
    ]
    assert wrong == []
    if mode == "cancel":
        assert sum(isinstance(r, asyncio.CancelledError) for r in results) >= min(POOL, len(calls))
    async with asyncio.timeout(HANG):
        found: list[str] = []
        for start in range(0, N, POOL):
            found += await asyncio.gather(
                *(retried(case.check, i) for i in range(start, start + POOL))
            )
    assert [f for f in found if f] == []
    await check_pool(proxy, admin, POOL)
    await cache.aclose()
    await all_closed(proxy)
