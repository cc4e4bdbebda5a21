"""The data-cache tests' common cache: a real Redis under the test's own prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache


@pytest.fixture
async def cache(real_redis: Redis, key_prefix: str) -> AsyncIterator[Cache]:
    """Closed after the test's background work (refreshes, lease releases) ends."""
    async with Cache(real_redis, key_prefix=key_prefix) as made:
        yield made
        await made.wait_background()
