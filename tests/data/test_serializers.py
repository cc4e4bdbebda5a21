"""Values' types on a real Redis: documented JSON conversions are the same on
a miss as on a hit, bytes stay bytes, pydantic models round-trip, counters."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import BaseModel
from redis.asyncio import Redis

from asgi_redis_kit.cache import Cache, PydanticSerializer
from tests.support import RedisSpy


class User(BaseModel):
    id: int
    name: str


async def test_memoized_datetime_has_one_type_on_miss_and_hit(
    real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)

    @cache.memoize(ttl=60)
    async def when() -> dt.datetime:
        return dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

    miss, hit = await when(), await when()
    assert type(miss) is type(hit)
    assert miss == hit


async def test_bytes_stay_bytes(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    await cache.set("b", b"\x00\xffraw", ttl=60)
    assert await cache.get("b") == b"\x00\xffraw"


async def test_pydantic_model_round_trips(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = 0

    @cache.memoize(ttl=60, serializer=PydanticSerializer(User))
    async def load(user_id: int) -> User:
        nonlocal calls
        calls += 1
        return User(id=user_id, name="ana")

    assert await load(1) == User(id=1, name="ana")
    assert await load(1) == User(id=1, name="ana")
    assert calls == 1


async def test_incr_keeps_ttl_and_refuses_non_counters(
    real_redis: Redis, key_prefix: str, spy: RedisSpy
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    assert await cache.incr("n", ttl=60) == 1
    assert await cache.incr("n", 2) == 3
    assert await cache.get("n") == 3
    assert type(await cache.get("n")) is int
    (entry,) = [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:e")]
    assert 0 < await real_redis.pttl(entry) <= 60_000
    await cache.set("s", "text", ttl=60)
    with pytest.raises(TypeError):
        await cache.incr("s")
    assert await cache.get("s") == "text"


async def test_unencodable_memoize_argument_names_it_and_key(
    real_redis: Redis, key_prefix: str, spy: RedisSpy
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)

    @cache.memoize(ttl=60)
    async def f(thing: object) -> int:
        return 1

    spy.reset()
    with pytest.raises(TypeError, match="thing") as raised:
        await f(object())
    assert "key=" in str(raised.value)
    assert spy.total == 0


async def test_self_is_excluded_and_methods_bind(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    calls = 0

    class Repo:
        @cache.memoize(ttl=60)
        async def find(self, x: int) -> int:
            nonlocal calls
            calls += 1
            return x * 10

    assert await Repo().find(2) == 20
    assert await Repo().find(2) == 20
    assert calls == 1
