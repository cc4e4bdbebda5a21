"""The deployments themselves: a healthy cluster and a Sentinel that fails over."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from tests.scaleout.servers import ClusterDeployment, CommandLog, SentinelDeployment

pytestmark = pytest.mark.real_redis


async def test_cluster_spreads_keys_and_follows_moved(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    keys = [f"probe:{i}" for i in range(30)]
    for key in keys:
        await cluster_client.set(key, key)
    owners = {cluster.owner_of(cluster.keyslot(key)) for key in keys}
    assert owners == set(cluster.ports), "30 keys should land on all three masters"

    slot = cluster.keyslot("probe:0")
    source = cluster.owner_of(slot)
    target = next(p for p in cluster.ports if p != source)
    cluster.migrate_slot(slot, target)
    assert await cluster_client.get("probe:0") == b"probe:0"
    assert "MovedError" in redis_log.error_kinds()
    assert redis_log.bad_errors() == []


async def test_sentinel_client_follows_failover(
    sentinel_deployment: SentinelDeployment, sentinel_master: Redis
) -> None:
    await sentinel_master.set("k", "v")
    old, new = sentinel_deployment.failover()
    assert old != new
    for _ in range(50):
        try:
            await sentinel_master.set("k2", "v2")
            break
        except RedisError:  # the first write after the switch may hit the old master
            await asyncio.sleep(0.1)
    assert await sentinel_master.get("k") == b"v"
