"""The data cache on a real Redis Cluster: the value API, counters, tags and
namespaces, and the memoize stampede and invalidation, with no command whose
keys span slots and no error reply (the cache fails open, which would hide one)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from asgi_redis_kit import Cache
from tests.scaleout.servers import HOST, ClusterDeployment, CommandLog

pytestmark = pytest.mark.real_redis


def assert_clean(cache: Cache, log: CommandLog, cluster: ClusterDeployment) -> None:
    spanning = [a[:3] for a, slots in cluster.multi_key_commands(log) if len(set(slots)) > 1]
    assert spanning == [], f"commands whose keys span slots: {spanning}"
    assert cache.stats.errors == 0
    assert log.bad_errors() == [], log.bad_errors()
    assert not log.names() & {"KEYS", "SCAN"}


async def test_values_counters_and_invalidation(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    cache = Cache(cluster_client, key_prefix=f"d{uuid.uuid4().hex[:6]}:")
    await cache.set("clave", "valor", ttl=30, tags=["a", "b"])
    assert await cache.get("clave") == "valor"
    await cache.invalidate_tags("b")
    assert await cache.get("clave") is None
    await cache.set("clave", None, ttl=30)
    assert await cache.exists("clave")
    assert await cache.delete("clave")
    assert not await cache.exists("clave")
    await cache.set_many({f"k{i}": i for i in range(20)}, ttl=30, tags=["many"])
    assert await cache.get_many([f"k{i}" for i in range(20)]) == list(range(20))
    await cache.clear()
    assert await cache.get_many(["k0", "k1"]) == [None, None]
    assert await cache.incr("n", 3) == 3
    assert await cache.incr("n") == 4
    assert await cache.get("n") == 4
    await cache.set("text", "x", ttl=30)
    with pytest.raises(TypeError):
        await cache.incr("text")
    assert_clean(cache, redis_log, cluster)


async def test_memoize_stampede_over_two_cluster_clients(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    prefix = f"m{uuid.uuid4().hex[:6]}:"
    second = RedisCluster(startup_nodes=[ClusterNode(HOST, port) for port in cluster.ports])
    a = Cache(cluster_client, key_prefix=prefix)
    b = Cache(second, key_prefix=prefix)
    calls = 0
    go = asyncio.Event()

    async def body(user_id: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        await go.wait()
        return {"id": user_id}

    f = a.memoize(ttl=30, tags=["user:{user_id}"])(body)
    g = b.memoize(ttl=30, tags=["user:{user_id}"])(body)
    try:
        tasks = [asyncio.create_task((f if i % 2 else g)(7)) for i in range(40)]
        await asyncio.sleep(0.3)
        go.set()
        assert await asyncio.gather(*tasks) == [{"id": 7}] * 40
        assert calls == 1
        assert await g(user_id=7) == {"id": 7}
        await b.invalidate_tags("user:7")
        assert await f(7) == {"id": 7}
        assert calls == 2
        assert await f.invalidate(7)
        assert await g(7) == {"id": 7}
        assert calls == 3
        assert_clean(a, redis_log, cluster)
    finally:
        await second.aclose()


async def test_every_write_loads_its_script_on_a_node_that_lost_it(
    own_cluster: ClusterDeployment, own_cluster_client: RedisCluster
) -> None:
    """After SCRIPT FLUSH on every node (a restart, a new replica promoted), each
    data-cache script is loaded again where its keys live, not refused."""
    from tests.scaleout.servers import sync_client

    cache = Cache(own_cluster_client, key_prefix="flushed:")
    calls = 0

    @cache.memoize(ttl=30, tags=["t"])
    async def f() -> int:
        nonlocal calls
        calls += 1
        return 5

    for port in own_cluster.ports:
        with sync_client(port) as client:
            client.script_flush()
    assert await f() == 5  # the store script
    await cache.set("k", "v", ttl=30, tags=["t"])
    assert await cache.incr("n") == 1
    assert await cache.delete("k")
    assert await f() == 5
    assert calls == 1
    assert cache.stats.errors == 0
