"""The data cache on a real 3-master Redis Cluster: values, counters, tags,
the memoize stampede and invalidation, with no command spanning slots."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio.cluster import RedisCluster

from asgi_redis_kit.cache import Cache
from tests.scaleout.servers import ClusterDeployment, CommandLog

pytestmark = pytest.mark.real_redis


def _no_backend_errors(cache: Cache, log: CommandLog, cluster: ClusterDeployment) -> None:
    spanning = [a[:3] for a, slots in cluster.multi_key_commands(log) if len(set(slots)) > 1]
    assert spanning == [], f"commands whose keys span slots: {spanning}"
    assert log.bad_errors() == [], f"error replies from the cluster: {log.bad_errors()}"
    assert not log.names() & {"KEYS", "SCAN"}
    assert cache.stats.as_dict()["errors"] == 0


async def test_values_counters_tags_and_memoize_on_cluster(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    cache = Cache(cluster_client, key_prefix=f"dc{uuid.uuid4().hex[:8]}:", timeout=5)
    await cache.set("clave", "valor", ttl=60, tags=["t:1"])
    assert await cache.get("clave") == "valor"
    assert await cache.incr("n", 5, ttl=60) == 5
    assert await cache.incr("n") == 6
    await cache.invalidate_tags("t:1")
    assert await cache.get("clave") is None
    await cache.set("gone", 1, ttl=60)
    assert await cache.delete("gone")
    assert not await cache.exists("gone")

    gate, started = asyncio.Event(), asyncio.Event()
    calls = 0

    @cache.memoize(ttl=60, tags=["user:{user_id}"])
    async def profile(user_id: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        started.set()
        await gate.wait()
        return {"id": user_id, "call": calls}

    tasks = [asyncio.create_task(profile(42)) for _ in range(50)]
    await started.wait()
    await asyncio.sleep(0.1)  # let the other callers reach their wait
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert {r["call"] for r in results} == {1}
    await cache.invalidate_tags("user:42")
    assert (await profile(42))["call"] == 2
    await profile.invalidate(42)
    assert (await profile(42))["call"] == 3
    _no_backend_errors(cache, redis_log, cluster)
    await cache.aclose()
