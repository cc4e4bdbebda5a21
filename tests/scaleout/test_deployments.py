"""The deployments themselves: a healthy cluster and a Sentinel that fails over."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

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


async def test_sentinel_names_the_master_and_the_replica_follows(
    sentinel_deployment: SentinelDeployment, sentinel_master: Redis
) -> None:
    await sentinel_master.set("k", "v")
    assert sentinel_deployment.master_port() == sentinel_deployment.master.port
    master, replica = sentinel_deployment.master.port, sentinel_deployment.replica.port
    for _ in range(100):
        if sentinel_deployment.replica_caught_up(replica, master):
            break
        await asyncio.sleep(0.05)
    with sentinel_deployment.replica.client() as direct:
        assert direct.get("k") == "v"
