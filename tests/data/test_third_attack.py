"""Third attack on the data cache: unusual callables under ``@cache.memoize``,
serializers that cannot read back what they wrote. Real Redis; the suite's
60 s pytest-timeout bounds each test, and this file's mark says so."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


@pytest.fixture
async def cache(real_redis: Redis, key_prefix: str) -> AsyncIterator[Cache]:
    async with Cache(real_redis, key_prefix=key_prefix) as made:
        yield made
        await made.wait_background()


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
