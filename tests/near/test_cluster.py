"""Redis Cluster: one tracker per primary, and a dead primary means bypass.

Tracking is per node (a REDIRECT target must be on the same node), so each
primary gets its own tracking connection; the view is usable only while all of
them are confirmed, and losing any flushes the cluster's entries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from asgi_redis_kit.near import NearCache, NearView
from tests.near.conftest import load, until, usable
from tests.scaleout.conftest import own_cluster, own_cluster_client
from tests.scaleout.servers import HOST, ClusterDeployment, wait_for

pytestmark = pytest.mark.real_redis

__all__ = ["own_cluster", "own_cluster_client"]  # fixtures, imported for pytest

PREFIX = "near:"


@pytest.fixture
async def writer(own_cluster: ClusterDeployment) -> AsyncIterator[RedisCluster]:
    """Another app instance's client."""
    client = RedisCluster(
        startup_nodes=[ClusterNode(HOST, port) for port in own_cluster.ports],
        socket_timeout=1,
        socket_connect_timeout=1,
    )
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


def one_key_per_master(cluster: ClusterDeployment) -> dict[int, str]:
    """A key under PREFIX on each master, by port."""
    found: dict[int, str] = {}
    for i in range(1000):
        key = f"{PREFIX}{{t{i}}}:k"
        found.setdefault(cluster.owner_of(cluster.keyslot(key)), key)
        if len(found) == len(cluster.ports):
            return found
    raise AssertionError("no key found for some master")


async def invalidated_everywhere(
    view: NearView, reader: RedisCluster, writer: RedisCluster, keys: list[str], value: bytes
) -> None:
    for key in keys:
        await writer.set(key, b"before " + value)
        assert await load(view, reader, key) == b"before " + value
    for key in keys:
        await writer.set(key, value)
    await until(lambda: all(view.get(key) is None for key in keys), 5)
    for key in keys:
        assert await load(view, reader, key) == value


async def test_one_tracker_per_primary_and_writes_on_every_node_invalidate(
    near: NearCache,
    own_cluster: ClusterDeployment,
    own_cluster_client: RedisCluster,
    writer: RedisCluster,
) -> None:
    view = await usable(near.view(own_cluster_client, PREFIX))
    assert near.stats.tracking == {f"{HOST}:{port}": "tracking" for port in own_cluster.ports}
    # The same cluster through another client object is another identity only if
    # its startup nodes differ; these are the same.
    assert near.view(writer, PREFIX) is view
    keys = list(one_key_per_master(own_cluster).values())
    await invalidated_everywhere(view, own_cluster_client, writer, keys, b"1")


async def test_a_killed_master_flushes_and_bypasses_until_it_is_back(
    near: NearCache,
    own_cluster: ClusterDeployment,
    own_cluster_client: RedisCluster,
    writer: RedisCluster,
) -> None:
    view = await usable(near.view(own_cluster_client, PREFIX))
    by_port = one_key_per_master(own_cluster)
    keys = list(by_port.values())
    await invalidated_everywhere(view, own_cluster_client, writer, keys, b"1")
    assert near.stats.entries == len(keys)
    victim = own_cluster.masters[0]
    victim.kill()
    await until(lambda: not view.usable, 10)
    assert near.stats.entries == 0  # every node's entries, not only the victim's
    assert near.stats.tracking[f"{HOST}:{victim.port}"] == "lost"
    survivor = by_port[own_cluster.masters[1].port]
    assert view.get(survivor) is None
    assert view.begin([survivor]) is None
    await asyncio.sleep(0.5)
    assert not view.usable  # still down: still bypassing

    victim.start()
    await asyncio.to_thread(
        wait_for,
        "the cluster to be whole again",
        lambda: all(own_cluster._state_ok(m) for m in own_cluster.masters),
        15,
    )
    await usable(view, 15)
    for client in (own_cluster_client, writer):  # connections to the victim died
        for node in client.get_nodes():
            await node.disconnect()
    await invalidated_everywhere(view, own_cluster_client, writer, keys, b"2")
