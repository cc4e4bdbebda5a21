"""@cache.memoize races against a real Redis: a refill that read before a
delete never stores over it, stale_while_revalidate refreshes once, a
cancelled leader leaves no lease."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from redis.asyncio import Redis

from asgi_redis_kit.cache import Cache


async def _until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


async def test_refill_never_stores_over_a_delete(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    gate = asyncio.Event()
    calls = 0

    @cache.memoize(ttl=60)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
            return -1  # the old computation
        return x

    first = asyncio.create_task(f(5))
    await _until(lambda: calls == 1, "the function never started")
    await f.invalidate(5)
    gate.set()
    assert await first == -1
    assert await f(5) == 5
    assert calls == 2


async def test_stale_while_revalidate_refreshes_once(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = 0

    @cache.memoize(ttl=1, stale_while_revalidate=60)
    async def f() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await f() == 1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    # Past its TTL the old value is served while one refresh runs.
    while calls == 1:
        assert loop.time() < deadline, "never refreshed"
        results = await asyncio.gather(*(f() for _ in range(10)))
        assert set(results) <= {1, 2}
        await asyncio.sleep(0.1)
    await cache.wait_background()
    assert calls == 2
    assert await f() == 2


async def test_cancelled_leader_leaves_no_lease(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    started = asyncio.Event()
    calls = 0

    @cache.memoize(ttl=60)
    async def f() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await asyncio.Event().wait()
        return calls

    task = asyncio.create_task(f())
    await started.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await cache.wait_background()
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:l")] == []
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:e")] == []
    assert await f() == 2


async def test_waiters_give_up_on_a_stuck_leader(redis_url: str, key_prefix: str) -> None:
    """The leader in one instance never finishes; a caller in the other waits
    ``lock_wait`` for its entry, then runs the function itself."""
    caches = [Cache(redis_url, key_prefix=key_prefix, timeout=5, lock_wait=0.3) for _ in range(2)]
    stuck = asyncio.Event()
    calls = 0

    async def f() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await stuck.wait()
        return calls

    memos = [cache.memoize(ttl=60)(f) for cache in caches]
    leader = asyncio.create_task(memos[0]())
    try:
        await _until(lambda: calls == 1, "the leader never started")
        assert await memos[1]() == 2
    finally:
        stuck.set()
        await leader
        for cache in caches:
            await cache.aclose()


async def test_waiters_in_process_get_the_leaders_exception(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    gate = asyncio.Event()
    calls = 0

    @cache.memoize(ttl=60)
    async def f() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise LookupError("nope")

    tasks = [asyncio.create_task(f()) for _ in range(10)]
    await _until(lambda: calls == 1, "the leader never started")
    await asyncio.sleep(0.1)  # let the others join the leader
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results)
    assert calls == 1
