"""Third attack on the data cache: unusual callables under ``@cache.memoize``,
serializers that cannot read back what they wrote. Real Redis; the suite's
60 s pytest-timeout bounds each test, and this file's mark says so."""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import os
import subprocess
import sys

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field, HttpUrl, SecretStr
from redis.asyncio import Redis

from asgi_redis_kit import Cache, Memoized, PydanticSerializer

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


async def label_of(cls: str, n: int) -> str:
    """A plain module-level function whose first parameter is called ``cls``
    (a class label, as in a classifier): not a method, nothing to leave out."""
    return f"{cls}:{n}"


async def test_a_plain_functions_first_parameter_named_cls_is_part_of_the_key(
    cache: Cache,
) -> None:
    # self/cls are left out for methods; a function that is no method's has
    # no instance to leave out, and two different arguments must never share
    # an entry (one caller would get the other's result).
    memo = cache.memoize(ttl=60)(label_of)
    assert await memo("spam", 1) == "spam:1"
    assert await memo("ham", 1) == "ham:1"
    assert memo.key("spam", 1) != memo.key("ham", 1)

    @cache.memoize(ttl=60)
    async def nested(self: str) -> str:  # a local function, not a method either
        return self

    assert await nested("a") == "a"
    assert await nested("b") == "b"


class Repo:
    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    async def load(self, n: int) -> str:
        return f"{self.tenant}:{n}"


async def tenant_load(tenant: str, n: int) -> str:
    return f"{tenant}:{n}"


async def test_a_bound_method_or_partial_never_shares_another_ones_results(
    cache: Cache,
) -> None:
    # memoize(repo.load) or memoize(partial(f, tenant)): the callable carries
    # its instance or its first arguments, which its signature does not show.
    # A default key of name and visible arguments gave tenant b tenant a's
    # data; no default key can name them, so memoize asks for key= (a
    # TypeError, as for an argument it cannot encode).
    a = Repo("a").load
    with pytest.raises(TypeError, match="key="):
        cache.memoize(ttl=60)(a)
    with pytest.raises(TypeError, match="key="):
        cache.memoize(ttl=60)(functools.partial(tenant_load, "a"))
    # With key= naming the tenant, both work.
    by_key = cache.memoize(ttl=60, key="repo:b:{n}")(Repo("b").load)
    assert await by_key(1) == "b:1"
    partial = cache.memoize(ttl=60, key="p:c:{n}")(functools.partial(tenant_load, "c"))
    assert await partial(1) == "c:1"
    assert await cache.get("p:c:1") == "c:1"


class Rate(BaseModel):
    pair: str
    value: float


async def test_pydantic_refuses_a_value_it_cannot_read_back(
    real_redis: Redis, key_prefix: str
) -> None:
    # pydantic writes NaN as null and then refuses null for a float: the value
    # validated, was stored, and no read could ever return it. set() then
    # stored what get() reads as absent, and a memoized call ran the function
    # and raised ValidationError on every call. Like the JSON serializer's
    # refusals: a TypeError before Redis, nothing stored.
    serializer = PydanticSerializer(Rate)
    nan = Rate(pair="EURUSD", value=float("nan"))
    async with Cache(real_redis, key_prefix=key_prefix, serializer=serializer) as cache:
        with pytest.raises(TypeError):
            await cache.set("rate", nan, ttl=60)
        runs = []

        @cache.memoize(ttl=60)
        async def rate() -> Rate:
            runs.append(1)
            return nan

        with pytest.raises(TypeError):
            await rate()
        assert [key async for key in real_redis.scan_iter(match=f"{key_prefix}*:e")] == []
        good = Rate(pair="EURUSD", value=1.1)
        await cache.set("rate", good, ttl=60)
        assert await cache.get("rate") == good
    with pytest.raises(TypeError):
        PydanticSerializer(bytes).dumps(b"\xff")  # not UTF-8: pydantic's ValueError


def tenant_loader(cache: Cache, tenant: str, *, keyed: bool) -> Memoized[[int], str]:
    """A factory of memoized closures: each closes over its tenant."""

    @cache.memoize(ttl=60, key=f"{tenant}:load:{{n}}" if keyed else None)
    async def load(n: int) -> str:
        return f"{tenant}:{n}"

    return load


async def test_closures_of_one_factory_share_a_name_and_key_keeps_them_apart(
    cache: Cache,
) -> None:
    # What a closure closes over is no argument: the default key cannot name it
    # (refusing closures would refuse every one that closes over a logger or a
    # client). The README says so and gives key= as the way; this holds it to both.
    shared = tenant_loader(cache, "a", keyed=False), tenant_loader(cache, "b", keyed=False)
    assert shared[0].key(1) == shared[1].key(1)
    a, b = tenant_loader(cache, "a", keyed=True), tenant_loader(cache, "b", keyed=True)
    assert await a(1) == "a:1"
    assert await b(1) == "b:1"


class Step(enum.IntEnum):
    ONE = 1
    TEN = 10


async def test_an_int_enum_amount_counts_and_never_reaches_redis_as_its_repr(
    cache: Cache,
) -> None:
    # An IntEnum is an int (incr's check passes) whose repr, which redis-py
    # sends for ints, is '<Step.ONE: 1>': the script failed on it, and that
    # bad input was reported as BackendUnavailable ("Redis did not answer")
    # and counted towards the breaker, so a route counting with an enum
    # opened the breaker for every caller of the cache.
    assert await cache.incr("steps", Step.ONE) == 1
    assert await cache.incr("steps", Step.TEN) == 11
    assert await cache.get("steps") == 11
    assert cache.stats.errors == 0
    assert cache.breaker.state == "closed"


async def test_an_invalidation_after_a_version_key_expired_never_brings_back_old_data(
    real_redis: Redis, key_prefix: str
) -> None:
    # Timeline (max_lifetime ML): t=0 invalidate_tags("t") -> version 1, kept
    # ML + 60 s. t=ML: set("k", "old", ttl=ML, tags=["t"]) -> stored under 1,
    # kept until 2 ML. t=ML+60: the version key expires (0: "old" reads as
    # absent, and nobody reads it). t=ML+61: the data changes,
    # invalidate_tags("t") -> 1 again, and "old", stored before that
    # invalidation, is served as current. The expiry is run early here (the
    # key removed, as its TTL would): everything else is as it happens.
    async with Cache(real_redis, key_prefix=key_prefix, max_lifetime=3600) as cache:
        version = cache.keys.tag_version("t")
        await cache.invalidate_tags("t")
        await cache.set("k", "old", ttl=3600, tags=["t"])
        assert 3600_000 < await real_redis.pttl(version) <= 3660_000
        await real_redis.delete(version)
        await asyncio.sleep(0.002)  # the minute or more that passes, as milliseconds
        await cache.invalidate_tags("t")
        assert await cache.get("k") is None


async def test_a_memoized_method_on_an_instance_is_what_its_bound_method_was(
    cache: Cache,
) -> None:
    # "Call it as the function": a memoized method reached through an instance
    # stands where the bound method stood, e.g. as a FastAPI dependency or
    # endpoint. It showed the function's signature, self included (FastAPI
    # asked the client for a query parameter "self": 422), and a sync
    # __call__ (frameworks would run it in a thread and get a coroutine).

    class Settings:
        async def plain(self, section: str = "ui") -> dict[str, str]:
            return {"section": section}

        @cache.memoize(ttl=60, key="settings:{section}")
        async def memoized(self, section: str = "ui") -> dict[str, str]:
            return {"section": section}

    settings = Settings()
    assert inspect.signature(settings.memoized) == inspect.signature(settings.plain)
    app = FastAPI()

    @app.get("/plain")
    async def plain(conf: dict[str, str] = Depends(settings.plain)) -> dict[str, str]:  # noqa: B008
        return conf

    @app.get("/memoized")
    async def memoized(conf: dict[str, str] = Depends(settings.memoized)) -> dict[str, str]:  # noqa: B008
        return conf

    app.get("/endpoint")(settings.memoized)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        for path in ("/plain", "/memoized", "/endpoint"):
            response = await http.get(path, params={"section": "mail"})
            assert (response.status_code, response.json()) == (200, {"section": "mail"}), path
    assert await cache.get("settings:mail") == {"section": "mail"}


class Search(BaseModel):
    tenant: str = Field(exclude=True)  # kept out of what the model serializes, not of the call
    text: str


class Tagged(BaseModel):
    tags: set[str]


async def tagged_load(item: Tagged) -> int:
    return len(item.tags)


async def test_a_pydantic_arguments_excluded_field_is_part_of_the_key(cache: Cache) -> None:
    # The default key encoded a model through model_dump(mode="json"), which
    # leaves out Field(exclude=True): two tenants' queries shared an entry.
    @cache.memoize(ttl=60)
    async def search(query: Search) -> str:
        return f"{query.tenant}:{query.text}"

    assert await search(Search(tenant="a", text="x")) == "a:x"
    assert await search(Search(tenant="b", text="x")) == "b:x"


def test_a_pydantic_arguments_set_field_has_one_key_in_every_process() -> None:
    # ... and turned a set into a list in iteration order, which differs
    # between processes (str hashes are randomised): no two processes ever
    # shared the entry of such an argument. Sets elsewhere are sorted.
    script = (
        "from asgi_redis_kit import Cache\n"
        "from tests.data.test_third_attack import Tagged, tagged_load\n"
        "memo = Cache('memory://').memoize(ttl=60)(tagged_load)\n"
        "print(memo.key(Tagged(tags={'alpha', 'beta', 'gamma', 'delta', 'epsilon'})))\n"
    )
    keys = set()
    for seed in range(6):
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": os.getcwd()}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        keys.add(done.stdout.strip())
    assert len(keys) == 1, keys


class Link(BaseModel):
    url: HttpUrl
    token: SecretStr | None = None


def test_a_pydantic_field_of_its_own_type_is_keyed_by_its_value_and_a_secret_is_refused() -> None:
    # Fields _canonical has no form for are keyed as pydantic makes them JSON,
    # except secrets, whose JSON ("**********") would give every secret one key.
    async def fetch(link: Link) -> str:
        return str(link.url)

    memo = Cache("memory://").memoize(ttl=60)(fetch)

    def link(url: str, token: str | None = None) -> Link:
        return Link.model_validate({"url": url, "token": token})

    one, two = link("https://a.example/x"), link("https://b.example/x")
    assert memo.key(one) == memo.key(link("https://a.example/x"))
    assert memo.key(one) != memo.key(two)
    with pytest.raises(TypeError, match="key="):
        memo.key(link("https://a.example/x", "p"))
