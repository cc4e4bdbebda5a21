"""Behaviour 7: invalidation by request/URL, by tag, by namespace; never KEYS/SCAN."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from starlette.requests import Request

from asgi_redis_kit import Cache
from tests.cache.conftest import Calls, Framework, Harness, build, client_for
from tests.support import RedisSpy


async def states(harness: Harness, *urls: str) -> list[str]:
    return [(await harness.client.get(url)).headers["x-cache"] for url in urls]


async def test_invalidate_tags_filled_from_path_params(harness: Harness, spy: RedisSpy) -> None:
    assert await states(harness, "/items/1", "/items/2") == ["MISS", "MISS"]
    spy.reset()
    assert await harness.cache.invalidate_tags("item:1") == 1
    assert spy.round_trips == 1
    assert await states(harness, "/items/1", "/items/2") == ["MISS", "HIT"]
    await harness.cache.invalidate_tags("items")
    assert await states(harness, "/items/1", "/items/2") == ["MISS", "MISS"]
    assert not {"KEYS", "SCAN"} & set(spy.commands)


async def test_the_example_app_flow_miss_hit_invalidate_miss(harness: Harness) -> None:
    assert await states(harness, "/echo", "/echo") == ["MISS", "HIT"]
    assert (await harness.client.post("/invalidate")).text == "invalidated 1"
    assert await states(harness, "/echo", "/echo") == ["MISS", "HIT"]


async def test_invalidate_one_url_reaches_all_its_variants(harness: Harness) -> None:
    await states(harness, "/items/1", "/items/1?q=a", "/items/2")
    await harness.client.head("/items/1")
    await harness.cache.invalidate("http://testserver/items/1")
    assert await states(harness, "/items/1", "/items/1?q=a", "/items/2") == ["MISS", "MISS", "HIT"]
    await harness.cache.invalidate(Request({"type": "http", **_scope("/items/2")}))
    assert await states(harness, "/items/2") == ["MISS"]
    with pytest.raises(ValueError, match="absolute URL"):
        await harness.cache.invalidate("/items/1")


def _scope(path: str) -> dict[str, object]:
    return {"path": path, "query_string": b"", "headers": [(b"host", b"testserver")]}


async def test_clear_is_one_bump_and_leaves_other_namespaces(
    framework: Framework, real_redis: Redis, key_prefix: str, spy: RedisSpy
) -> None:
    one = Cache(real_redis, key_prefix=key_prefix, namespace="one")
    two = Cache(real_redis, key_prefix=key_prefix, namespace="two")
    calls_one, calls_two = Calls(), Calls()
    async with (
        client_for(build(framework, one, calls_one)) as a,
        client_for(build(framework, two, calls_two)) as b,
    ):
        for client in (a, b):
            await client.get("/page")
        spy.reset()
        assert await two.clear() > 1  # a new generation starts at Redis's clock (BUMP)
        assert dict(spy.commands) == {"EVAL": 1}
        assert (await a.get("/page")).headers["x-cache"] == "HIT"
        assert (await b.get("/page")).headers["x-cache"] == "MISS"
    await one.aclose()
    await two.aclose()


async def test_an_admin_script_invalidates_with_its_own_cache(
    harness: Harness, redis_url: str, key_prefix: str
) -> None:
    await states(harness, "/echo")
    admin = Cache(redis_url, key_prefix=key_prefix)  # same scheme, own client
    await admin.invalidate_tags("report")
    await admin.aclose()
    assert await states(harness, "/echo") == ["MISS"]


async def test_invalidation_during_a_miss_is_not_lost(harness: Harness) -> None:
    """Tag sets race (invalidate between handler and SADD leaves a stale entry);
    versions checked on read do not: the entry stored under the old version is
    never served."""
    harness.calls.gate = asyncio.Event()
    pending = asyncio.create_task(harness.client.get("/page?v=1"))
    await harness.calls.entered.wait()
    await harness.cache.clear()  # while the handler is still computing
    harness.calls.gate.set()
    assert (await pending).headers["x-cache"] == "MISS"
    assert await states(harness, "/page?v=1", "/page?v=1") == ["MISS", "HIT"]


async def test_version_keys_expire_after_every_entry_they_guard(
    harness: Harness, real_redis: Redis, key_prefix: str
) -> None:
    await harness.cache.invalidate_tags("item:9")
    (tag_key,) = [k async for k in real_redis.scan_iter(match=f"{key_prefix}*t:*")]
    ttl = await real_redis.pttl(tag_key)
    assert harness.cache.max_lifetime * 1000 < ttl <= (harness.cache.max_lifetime + 60) * 1000
