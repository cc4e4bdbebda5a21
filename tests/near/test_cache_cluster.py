"""Redis Cluster: the near layer reads each key's PTTL in the lookup's own
pipeline, keeps what it read, and a hit then sends nothing; another
instance's invalidation reaches it.

``redis_log`` records every command the cluster client's connections send
(the trackers' too: they are made from the client's connection class); the
NearCache's 60 s heartbeat keeps the trackers quiet while it counts."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest
from redis.asyncio.cluster import RedisCluster

from asgi_redis_kit import Cache, NearCache
from tests.near.cache_app import body, http, make_app, near_ready
from tests.scaleout.conftest import cluster, cluster_client, redis_log
from tests.scaleout.servers import CommandLog

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(120)]

__all__ = ["cluster", "cluster_client", "redis_log"]  # fixtures, imported for pytest


async def test_cluster_hits_send_nothing_and_invalidations_reach_them(
    cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    prefix = f"nc{uuid.uuid4().hex[:8]}:"
    near = NearCache(heartbeat=60, heartbeat_timeout=5)
    cache = Cache(cluster_client, key_prefix=prefix, timeout=5, near_cache=near)
    other = Cache(cluster_client, key_prefix=prefix, timeout=5)
    calls: Counter[str] = Counter()
    try:
        async with http(make_app(cache, calls)) as client:
            await near_ready(cache, 20)
            assert await body(client, "/page") == "page 1"
            for _ in range(100):
                redis_log.clear()
                assert await body(client, "/page") == "page 1"
                if not redis_log.commands:
                    break
                await asyncio.sleep(0.01)
            assert not redis_log.commands, redis_log.commands
            for _ in range(5):
                assert await body(client, "/page") == "page 1"
            assert not redis_log.commands, redis_log.commands
            # Another instance (no near cache) invalidates the tag.
            await other.invalidate_tags("page")
            for _ in range(200):
                if await body(client, "/page") == "page 2":
                    break
                await asyncio.sleep(0.01)
            assert calls["page"] == 2
    finally:
        await other.aclose()
        await cache.aclose()
        await near.aclose()
