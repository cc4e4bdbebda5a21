"""A command is never sent twice by a client we make (found in review).

redis-py resends a command once when its connection breaks, if the client has a
retry. When the break comes after Redis ran the command and before its reply
arrived, the resend runs it again: one ``incr`` counted twice, within one
request that answered 200, with no client retry involved. A timeout or a broken
connection must mean "unknown" to the caller (a 503), never a silent second run.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import BackendUnavailable, SessionStore
from tests.support import DelayProxy, RedisProcess

pytestmark = pytest.mark.real_redis


async def test_a_connection_broken_mid_reply_is_an_error_not_a_second_incr(
    own_redis: RedisProcess,
) -> None:
    peek = Redis.from_url(own_redis.url)
    async with DelayProxy(own_redis.port) as proxy:
        store = SessionStore(proxy.url, key_prefix="nr:", timeout=5)
        try:
            await store.save(
                "a" * 43, create=True, fields={"d:n": b"0", "m:created": b"1"}, ttl_ms=60_000
            )
            key = store.session_key("a" * 43)
            replies = proxy.chunks["replies"]
            proxy.latency = 30  # Redis runs the command at once; its reply is held back
            incr = asyncio.create_task(store.incr("a" * 43, "n", 1))
            await proxy.until_chunks("replies", replies + 1)
            assert await peek.hget(key, "d:n") == b"1"  # it ran in Redis
            # The connection breaks before the reply reaches the client; the proxy
            # is back at once, so a client that resends can reach Redis again.
            await proxy.stop()
            proxy.latency = 0
            await proxy.start()
            with pytest.raises(BackendUnavailable):
                await incr
            assert await peek.hget(key, "d:n") == b"1"  # never run a second time
            assert await store.incr("a" * 43, "n", 1) == 2  # and the next call works
        finally:
            await store.aclose()
            await peek.aclose()
