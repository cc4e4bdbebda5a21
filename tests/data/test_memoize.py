"""``@cache.memoize`` on a real Redis: canonical keys, the stampede across two
instances, stale-while-revalidate and stale-if-error, exceptions and
cancellation, invalidation shared with cached pages."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_redis_kit import Cache, CacheMiddleware, cached

pytestmark = pytest.mark.real_redis


@pytest.fixture
async def other(redis_url: str, key_prefix: str) -> AsyncIterator[Cache]:
    """A second instance: its own client and connections, as another process."""
    async with Cache(redis_url, key_prefix=key_prefix) as made:
        yield made


async def no_keys_like(client: Redis, pattern: str) -> bool:
    return not [key async for key in client.scan_iter(match=pattern)]


async def test_equal_calls_share_one_entry(cache: Cache) -> None:
    calls: list[tuple[int, int]] = []

    @cache.memoize(ttl=60)
    async def f(x: int, y: int = 2) -> list[int]:
        calls.append((x, y))
        return [x, y]

    assert await f(1) == [1, 2]
    assert await f(x=1) == [1, 2]
    assert await f(1, y=2) == [1, 2]
    assert await f(1, 2) == [1, 2]
    assert calls == [(1, 2)]
    assert f.key(1) == f.key(x=1, y=2)
    assert f.key(1) != f.key(1, 3)
    assert await f(1, 3) == [1, 3]
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, 1.0),
        (1, True),
        (None, float("nan")),
        ([1, 2], (1, 2)),
        ("1", 1),
        ({"a": 1}, {"a": 1.0}),
        (datetime.date(2026, 1, 1), "2026-01-01"),
    ],
)
async def test_distinct_arguments_never_share_an_entry(cache: Cache, a: Any, b: Any) -> None:
    @cache.memoize(ttl=60)
    async def f(x: Any) -> str:
        return repr(x)

    assert f.key(a) != f.key(b)


async def test_dicts_and_sets_in_any_order_share_an_entry(cache: Cache) -> None:
    @cache.memoize(ttl=60)
    async def f(x: Any) -> int:
        return 1

    assert f.key({"a": 1, "b": 2}) == f.key({"b": 2, "a": 1})
    assert f.key({3, 1, 2}) == f.key({1, 2, 3})


async def test_an_argument_without_canonical_encoding_is_a_clear_error(
    cache: Cache, spy: Any
) -> None:
    class Opaque:
        pass

    ran = []

    @cache.memoize(ttl=60)
    async def f(thing: Any) -> int:
        ran.append(thing)
        return 1

    spy.reset()
    with pytest.raises(TypeError, match=r"argument 'thing'.*key="):
        await f(Opaque())
    assert not ran
    assert spy.total == 0

    @cache.memoize(ttl=60, key="thing:{thing.name}")
    async def g(thing: Any) -> int:
        ran.append(thing)
        return 1

    class Named:
        name = "n"

    assert await g(Named()) == 1
    assert await cache.exists("thing:n")


async def test_self_is_left_out_and_methods_work(cache: Cache) -> None:
    runs = []

    class Repo:
        def __init__(self, label: str) -> None:
            self.label = label

        @cache.memoize(ttl=60, tags=["user:{user_id}"])
        async def load(self, user_id: int) -> dict[str, Any]:
            runs.append(self.label)
            return {"id": user_id}

    assert await Repo("a").load(7) == {"id": 7}
    assert await Repo("b").load(user_id=7) == {"id": 7}
    assert runs == ["a"]
    assert await Repo("b").load.invalidate(7)
    assert await Repo("b").load(7) == {"id": 7}
    assert runs == ["a", "b"]


async def test_templates_are_checked_when_decorating(cache: Cache) -> None:
    with pytest.raises(ValueError, match="user"):

        @cache.memoize(ttl=60, tags=["user:{user}"])
        async def f(user_id: int) -> int:
            return 1

    with pytest.raises(TypeError):
        cache.memoize(ttl=60)(lambda: 1)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="ttl"):
        cache.memoize(ttl=0)


async def test_a_miss_returns_what_a_hit_will(cache: Cache) -> None:
    @cache.memoize(ttl=60)
    async def when() -> datetime.datetime:
        return datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    first, second = await when(), await when()
    assert first == second == "2026-01-01T00:00:00+00:00"


async def test_a_stampede_over_two_instances_runs_the_function_once(
    cache: Cache, other: Cache
) -> None:
    calls = 0
    started = asyncio.Event()
    release = asyncio.Event()

    async def body(x: int) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return x * 10

    f = cache.memoize(ttl=60)(body)
    g = other.memoize(ttl=60)(body)
    tasks = [asyncio.create_task((f if i % 2 else g)(4)) for i in range(100)]
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.2)  # every call has looked up and now waits
    release.set()
    assert await asyncio.gather(*tasks) == [40] * 100
    assert calls == 1


async def test_waiters_give_up_on_a_stuck_leader(redis_url: str, key_prefix: str) -> None:
    async with (
        Cache(redis_url, key_prefix=key_prefix, lock_wait=0.3) as a,
        Cache(redis_url, key_prefix=key_prefix, lock_wait=0.3) as b,
    ):
        stuck = asyncio.Event()

        @a.memoize(ttl=60, key="slow")
        async def leader() -> str:
            await stuck.wait()
            return "leader"

        @b.memoize(ttl=60, key="slow")
        async def waiter() -> str:
            return "waiter"

        lead = asyncio.create_task(leader())
        await asyncio.sleep(0.1)  # the leader holds the lease
        assert await asyncio.wait_for(waiter(), 5) == "waiter"
        stuck.set()
        assert await lead == "leader"


async def test_exceptions_are_not_cached_and_reach_the_waiters(cache: Cache) -> None:
    calls = 0
    go = asyncio.Event()

    @cache.memoize(ttl=60)
    async def f() -> int:
        nonlocal calls
        calls += 1
        await go.wait()
        if calls == 1:
            raise RuntimeError("database down")
        return 5

    tasks = [asyncio.create_task(f()) for _ in range(5)]
    await asyncio.sleep(0.1)
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert calls == 1
    assert await f() == 5
    assert calls == 2


async def test_a_cancelled_leader_leaves_no_lease_and_no_entry(
    cache: Cache, real_redis: Redis, key_prefix: str
) -> None:
    running = asyncio.Event()

    @cache.memoize(ttl=60, key="cancelled")
    async def f() -> int:
        running.set()
        await asyncio.sleep(30)
        return 1

    task = asyncio.create_task(f())
    await asyncio.wait_for(running.wait(), 5)
    key = cache.value_key("cancelled")
    assert await real_redis.exists(key.lock)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await cache.wait_background()
    assert not await real_redis.exists(key.lock)
    assert not await real_redis.exists(key.entry)

    @cache.memoize(ttl=60, key="cancelled")
    async def g() -> int:
        return 2

    assert await g() == 2


async def test_a_refill_never_stores_over_a_delete(cache: Cache, other: Cache) -> None:
    computing = asyncio.Event()
    finish = asyncio.Event()

    @cache.memoize(ttl=60, key="racy")
    async def old_computation() -> str:
        computing.set()
        await finish.wait()
        return "computed before the delete"

    task = asyncio.create_task(old_computation())
    await asyncio.wait_for(computing.wait(), 5)
    await other.delete("racy")
    finish.set()
    assert await task == "computed before the delete"  # its caller still gets it
    assert await other.get("racy") is None


async def test_stale_while_revalidate_refreshes_once_in_the_background(cache: Cache) -> None:
    calls = 0

    @cache.memoize(ttl=0.2, stale_while_revalidate=30)
    async def f() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return calls

    assert await f() == 1
    await asyncio.sleep(0.3)
    stale = await asyncio.gather(*(f() for _ in range(10)))
    assert stale == [1] * 10
    await cache.wait_background()
    assert calls == 2
    assert await f() == 2
    assert cache.stats.data_refreshes == 1


async def test_stale_if_error_serves_the_old_value(cache: Cache) -> None:
    fail = False

    @cache.memoize(ttl=0.2, stale_if_error=30)
    async def f() -> str:
        if fail:
            raise RuntimeError("upstream down")
        return "old"

    assert await f() == "old"
    await asyncio.sleep(0.3)
    fail = True
    assert await f() == "old"
    fail = False
    assert await f() == "old"  # refilled now that it works


async def test_a_tag_drops_the_memoized_data_and_the_cached_page(cache: Cache) -> None:
    runs = {"data": 0, "page": 0}

    @cache.memoize(ttl=60, tags=["item:{item_id}"])
    async def load(item_id: int) -> dict[str, int]:
        runs["data"] += 1
        return {"id": item_id}

    @cached(ttl=60, tags=["item:{item_id}"])
    async def page(request: Request) -> PlainTextResponse:
        runs["page"] += 1
        return PlainTextResponse(str(await load(int(request.path_params["item_id"]))))

    app = CacheMiddleware(Starlette(routes=[Route("/items/{item_id}", page)]), cache=cache)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as http:
        for _ in range(2):
            assert (await http.get("/items/42")).status_code == 200
        assert runs == {"data": 1, "page": 1}
        assert await cache.invalidate_tags("item:42") == 1
        assert (await http.get("/items/42")).headers["x-cache"] == "MISS"
        assert runs == {"data": 2, "page": 2}
        assert await load(7) == {"id": 7}
        assert runs["data"] == 3


async def test_a_function_returning_none_is_cached(cache: Cache) -> None:
    calls = 0

    @cache.memoize(ttl=60)
    async def nothing() -> None:
        nonlocal calls
        calls += 1

    first = await nothing()  # type: ignore[func-returns-value]
    second = await nothing()  # type: ignore[func-returns-value]
    assert first is None
    assert second is None
    assert calls == 1


async def test_a_call_cancelled_while_taking_the_lease_gives_it_back(
    redis_url: str, key_prefix: str, real_redis: Redis
) -> None:
    """A stale entry's refill takes the lease in a round trip of its own; a caller
    cancelled while that reply is on its way must not leave the lease held."""
    from urllib.parse import urlsplit

    from tests.support import DelayProxy

    proxy = await DelayProxy(urlsplit(redis_url).port or 6379).start()
    try:
        async with Cache(proxy.url, key_prefix=key_prefix, timeout=5) as cache:

            @cache.memoize(ttl=0.05, stale_if_error=60, key="leased")
            async def f() -> int:
                return 1

            assert await f() == 1
            await asyncio.sleep(0.1)  # stale, in its error window: a refill acquires
            lock = cache.value_key("leased").lock
            proxy.latency = 0.5
            task = asyncio.create_task(f())
            # The acquire's SET has run in Redis; its reply waits in the proxy.
            for _ in range(500):
                if await real_redis.exists(lock):
                    break
                await asyncio.sleep(0.01)
            assert await real_redis.exists(lock)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            proxy.latency = 0
            await cache.wait_background()
            assert not await real_redis.exists(lock)
    finally:
        await proxy.stop()


async def test_types_of_one_name_from_two_modules_are_distinct_arguments(cache: Cache) -> None:
    import dataclasses as dc

    first = dc.make_dataclass("Point", [("x", int)])
    second = dc.make_dataclass("Point", [("x", int)])
    first.__module__, second.__module__ = "shop.a", "shop.b"

    @cache.memoize(ttl=60)
    async def f(p: Any) -> int:
        return 1

    assert f.key(first(1)) != f.key(second(1))
    assert f.key(first(1)) == f.key(first(1))


async def test_a_tag_template_that_fills_to_nothing_is_refused(cache: Cache, spy: Any) -> None:
    @cache.memoize(ttl=60, tags=["{label}"])
    async def f(label: str) -> int:
        return 1

    spy.reset()
    with pytest.raises(TypeError, match="tag"):
        await f("")
    assert spy.total == 0
