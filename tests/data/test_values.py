"""The data cache's value API on a real Redis: the article's seed example, None
as a value, TTLs, invalidation by key, tag and namespace in O(1), counters,
serializers, and bad input refused before any Redis command."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import BackendUnavailable, Cache, PydanticSerializer
from asgi_redis_kit.cache import MAX_KEY_LENGTH
from tests.support import RedisSpy

pytestmark = pytest.mark.real_redis


async def until_gone(cache: Cache, key: str, within: float = 10.0) -> None:
    start = time.monotonic()
    while await cache.exists(key):
        assert time.monotonic() - start < within, f"{key!r} still there after {within} s"
        await asyncio.sleep(0.05)


async def test_the_seed_example(cache: Cache) -> None:
    await cache.set("clave", "valor", ttl=3600)
    assert await cache.get("clave") == "valor"
    await cache.set("corta", "valor", ttl=0.3)
    assert await cache.get("corta") == "valor"
    await until_gone(cache, "corta")
    assert await cache.get("corta") is None


async def test_the_entry_expires_in_redis_with_its_ttl(cache: Cache, real_redis: Redis) -> None:
    await cache.set("clave", "valor", ttl=100)
    pttl = await real_redis.pttl(cache.value_key("clave").entry)
    assert 99_000 < pttl <= 100_000


async def test_none_is_a_value_not_a_miss(cache: Cache) -> None:
    assert await cache.get("nada", "default") == "default"
    assert not await cache.exists("nada")
    await cache.set("nada", None, ttl=60)
    assert await cache.exists("nada")
    assert await cache.get("nada", "default") is None


async def test_values_come_back_as_json_types(cache: Cache) -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    when = datetime.datetime(2026, 12, 2, 12, 0, tzinfo=datetime.UTC)
    ident = uuid.UUID(int=7)
    value = {"n": 1, "f": 1.5, "b": True, "s": "ñ", "l": [1, None], "d": {"k": "v"}}
    await cache.set("plain", value, ttl=60)
    assert await cache.get("plain") == value
    await cache.set("converted", [when, ident, Point(1, 2), (1, 2)], ttl=60)
    assert await cache.get("converted") == [
        "2026-12-02T12:00:00+00:00",
        str(ident),
        {"x": 1, "y": 2},
        [1, 2],
    ]
    await cache.set("raw", b"\x00\xffbytes", ttl=60)
    assert await cache.get("raw") == b"\x00\xffbytes"


async def test_pydantic_models_round_trip(real_redis: Redis, key_prefix: str) -> None:
    pydantic = pytest.importorskip("pydantic")  # a dependency of the test extra (FastAPI)

    class User(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        id: int
        seen: datetime.datetime

    async with Cache(
        real_redis, key_prefix=key_prefix, serializer=PydanticSerializer(list[User])
    ) as cache:
        users = [User(id=1, seen=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))]
        await cache.set("users", users, ttl=60)
        back = await cache.get("users")
        assert back == users
        assert isinstance(back[0].seen, datetime.datetime)
        with pytest.raises(TypeError):
            await cache.set("users", [{"id": "not a number"}], ttl=60)


async def test_get_many_and_set_many(cache: Cache) -> None:
    await cache.set_many({"a": 1, "b": None}, ttl=60, tags=["many"])
    assert await cache.get_many(["a", "b", "c"], default="-") == [1, None, "-"]
    await cache.invalidate_tags("many")
    assert await cache.get_many(["a", "b"], default="-") == ["-", "-"]


async def test_delete(cache: Cache) -> None:
    await cache.set("k", "v", ttl=60)
    assert await cache.delete("k") is True
    assert await cache.get("k") is None
    assert await cache.delete("k") is False


async def test_a_second_instance_sees_every_invalidation(
    cache: Cache, redis_url: str, key_prefix: str
) -> None:
    async with Cache(redis_url, key_prefix=key_prefix) as other:
        await cache.set("k", "v", ttl=60, tags=["t1", "t2"])
        assert await other.get("k") == "v"  # learns the tags from the record
        await other.invalidate_tags("t2")
        assert await cache.get("k") is None
        await cache.set("k", "v2", ttl=60)
        assert await other.get("k") == "v2"
        await other.clear()
        assert await cache.get("k") is None
        await other.set("k", "v3", ttl=60, tags=["t1"])
        assert await cache.get("k") == "v3"
        await cache.delete("k")
        assert await other.get("k") is None


@pytest.mark.parametrize("entries", [1, 50])
async def test_invalidation_is_o1(cache: Cache, spy: RedisSpy, entries: int) -> None:
    """The commands an invalidation sends do not grow with what it drops."""
    for i in range(entries):
        await cache.set(f"k{i}", i, ttl=60, tags=["shared"])
    await cache.delete("warm")  # Redis has the script from then on (no NOSCRIPT below)
    sent = {}
    invalidations: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("tag", lambda: cache.invalidate_tags("shared")),
        ("namespace", lambda: cache.clear()),
        ("key", lambda: cache.delete("k0")),
    ]
    for name, invalidate in invalidations:
        spy.reset()
        await invalidate()
        sent[name] = (spy.total, spy.round_trips)
        assert not {"KEYS", "SCAN", "SMEMBERS"} & set(spy.commands)
    # MULTI, the bump script, EXEC / INCR / one script.
    assert sent == {"tag": (3, 1), "namespace": (1, 1), "key": (1, 1)}
    assert await cache.get_many([f"k{i}" for i in range(entries)]) == [None] * entries


async def test_set_is_one_round_trip_and_a_hit_one_command(cache: Cache, spy: RedisSpy) -> None:
    await cache.set("warm", 0, ttl=60)  # Redis has the script from then on
    spy.reset()
    await cache.set("k", {"v": 1}, ttl=60, tags=["a", "b"])
    assert (spy.total, spy.round_trips) == (1, 1)
    spy.reset()
    assert await cache.get("k") == {"v": 1}
    assert (spy.total, spy.round_trips) == (1, 1)


async def test_counters(cache: Cache, redis_url: str, key_prefix: str, real_redis: Redis) -> None:
    assert await cache.incr("visits") == 1
    assert await cache.incr("visits", 5) == 6
    assert await cache.incr("visits", -2) == 4
    assert await cache.get("visits") == 4
    # 5 s deadlines: the burst opens fresh connections, slow on a loaded machine.
    async with (
        Cache(real_redis, key_prefix=key_prefix, timeout=5) as one,
        Cache(redis_url, key_prefix=key_prefix, timeout=5) as other,
    ):
        await asyncio.gather(*(c.incr("many") for c in (one, other) for _ in range(100)))
        assert await other.get("many") == 200
    await cache.clear()
    assert await cache.incr("visits") == 1  # clear() resets counters too


async def test_a_counter_keeps_its_first_ttl(cache: Cache, real_redis: Redis) -> None:
    await cache.incr("c", ttl=100)
    entry = cache.value_key("c").entry
    await real_redis.pexpire(entry, 50_000)
    await cache.incr("c", ttl=100)
    assert 0 < await real_redis.pttl(entry) <= 50_000


async def test_incr_refuses_a_value_that_is_not_a_counter(cache: Cache) -> None:
    await cache.set("text", "hola", ttl=60)
    with pytest.raises(TypeError):
        await cache.incr("text")
    assert await cache.get("text") == "hola"
    await cache.set("tagged", 3, ttl=60, tags=["t"])
    with pytest.raises(TypeError):
        await cache.incr("tagged")
    assert await cache.get("tagged") == 3
    with pytest.raises(ValueError, match="2\\*\\*53"):
        await cache.incr("big", 2**53)


class Unencodable:
    pass


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.get(42), TypeError),
        (lambda c: c.get(b"bytes"), TypeError),
        (lambda c: c.get(""), ValueError),
        (lambda c: c.get("k" * (MAX_KEY_LENGTH + 1)), ValueError),
        (lambda c: c.get("\ud800"), ValueError),
        (lambda c: c.set("k", {1, 2}, ttl=60), TypeError),
        (lambda c: c.set("k", Unencodable(), ttl=60), TypeError),
        (lambda c: c.set("k", {1: "non-str key"}, ttl=60), TypeError),
        (lambda c: c.set("k", "v", ttl=0), ValueError),
        (lambda c: c.set("k", "v", ttl=-1), ValueError),
        (lambda c: c.set("k", "v", ttl=0.0005), ValueError),
        (lambda c: c.set("k", "v", ttl=float("nan")), ValueError),
        (lambda c: c.set("k", "v", ttl=float("inf")), ValueError),
        (lambda c: c.set("k", "v", ttl=True), TypeError),
        (lambda c: c.set("k", "v", ttl="60"), TypeError),
        (lambda c: c.set("k", "v", ttl=60, tags="one-string"), TypeError),
        (lambda c: c.set_many({"a": 1, "b": {3}}, ttl=60), TypeError),
        (lambda c: c.incr("k", 1.5), TypeError),
        (lambda c: c.incr("k", ttl=0), ValueError),
        (lambda c: c.delete(None), TypeError),
    ],
)
async def test_bad_input_is_refused_before_redis(
    cache: Cache, spy: RedisSpy, call: Any, error: type[Exception]
) -> None:
    spy.reset()
    with pytest.raises(error):
        await call(cache)
    assert spy.total == 0
    assert await cache.get("k") is None
    assert await cache.get("a") is None


async def test_the_longest_key_works(cache: Cache) -> None:
    key = "k" * MAX_KEY_LENGTH
    await cache.set(key, 1, ttl=60)
    assert await cache.get(key) == 1


async def test_writes_raise_and_reads_fail_open_without_redis(own_redis: Any) -> None:
    async with Cache(own_redis.url, timeout=0.2, key_prefix="x:") as cache:
        await cache.set("k", "v", ttl=60)
        own_redis.stop()
        assert await cache.get("k", "default") == "default"
        assert await cache.exists("k") is False
        assert await cache.get_many(["k"]) == [None]
        for write in (
            cache.set("k", "v", ttl=60),
            cache.delete("k"),
            cache.incr("n"),
            cache.set_many({"a": 1}),
        ):
            with pytest.raises(BackendUnavailable):
                await write
