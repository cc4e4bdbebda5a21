"""Redis Cluster: one tracker per primary, and a dead primary means bypass.

Tracking is per node (a REDIRECT target must be on the same node), so each
primary gets its own tracking connection; the view is usable only while all of
them are confirmed, and losing any flushes the cluster's entries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from asgi_redis_kit.near import NearCache, NearView
from tests.near.conftest import load, until, usable
from tests.scaleout.conftest import own_cluster, own_cluster_client
from tests.scaleout.servers import HOST, ClusterDeployment, ServerStartError, sync_client, wait_for
from tests.support import free_port

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


def add_replica(cluster: ClusterDeployment, master_port: int) -> int:
    """Start a replica of the master on ``master_port``; its port once in sync."""
    args = [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-port", str(free_port()),
        "--cluster-node-timeout", "3000",
    ]  # fmt: skip
    replica = cluster._add(f"replica{len(cluster.servers)}", args)
    with sync_client(master_port) as client:
        # "<id> 127.0.0.1:<port>@<bus port> myself,master ...": the bus port is
        # not port + 10000 here, so MEET must be told it.
        [me] = [
            line
            for line in client.execute_command("CLUSTER", "NODES").splitlines()
            if "myself" in line
        ]
        bus = me.split()[1].split("@")[1].split(",")[0]
    with sync_client(replica.port) as client:
        client.execute_command("CLUSTER", "MEET", HOST, str(master_port), bus)
    master_id = cluster.node_id(master_port)

    with sync_client(master_port) as client:
        client.config_set("repl-diskless-sync-delay", 0)

    def replicate() -> bool:
        with sync_client(replica.port) as client:
            try:
                client.execute_command("CLUSTER", "REPLICATE", master_id)
            except ResponseError:
                return False  # the master is not known to it yet
            return True

    def synced() -> bool:
        # Not REPLICATE again: each call restarts the replication link.
        with sync_client(replica.port) as client:
            return bool(client.info("replication").get("master_link_status") == "up")

    wait_for("the replica to learn of its master", replicate, timeout=20, interval=0.1)
    wait_for("the replica to sync", synced, timeout=20, interval=0.1)
    return replica.port


async def test_a_new_primary_is_tracked_and_the_old_entries_are_flushed(
    near: NearCache,
    own_cluster: ClusterDeployment,
    own_cluster_client: RedisCluster,
    writer: RedisCluster,
) -> None:
    by_port = one_key_per_master(own_cluster)
    old_port = own_cluster.ports[0]
    new_port = await asyncio.to_thread(add_replica, own_cluster, old_port)
    view = await usable(near.view(own_cluster_client, PREFIX))
    keys = list(by_port.values())
    await invalidated_everywhere(view, own_cluster_client, writer, keys, b"1")
    flushes = near.stats.flushes

    def promoted() -> bool:
        # TAKEOVER: no agreement from the master needed, which may not have heard
        # of its new replica by gossip yet. Asked again while it has not happened:
        # on a loaded machine one can be lost.
        with sync_client(new_port) as client:
            if client.info("replication")["role"] == "master":
                return True
            client.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            return False

    await asyncio.to_thread(wait_for, "the replica to take over", promoted, 20, 2.0)
    try:
        await asyncio.to_thread(
            wait_for,
            "the old primary to learn of the new one",
            lambda: own_cluster.owner_of(own_cluster.keyslot(by_port[old_port])) == new_port,
            20,
        )
    except ServerStartError as exc:
        with sync_client(old_port) as client:
            nodes = client.execute_command("CLUSTER", "NODES")
        raise AssertionError(f"{exc}; the old primary's CLUSTER NODES:\n{nodes}") from None
    # The client learns of the new primary from a MOVED (or its own refresh).
    for client in (own_cluster_client, writer):
        await until_served(client, by_port[old_port])
    await until(lambda: f"{HOST}:{new_port}" in near.stats.tracking, 10)
    assert near.stats.flushes > flushes
    await usable(view)
    # The old primary may still be tracked for a while: the client drops it from
    # its primaries only once it has learnt the new topology in full (a replica
    # tracked for nothing is harmless).
    assert near.stats.entries == 0
    await invalidated_everywhere(view, own_cluster_client, writer, keys, b"2")


async def until_served(client: RedisCluster, key: str) -> None:
    for _ in range(100):
        try:
            await client.get(key)
        except (RedisError, RedisClusterException):
            await asyncio.sleep(0.1)
            continue
        node = client.get_node_from_key(key)
        if node is not None and node in client.get_primaries():
            return
    raise AssertionError(f"{key!r} never served")


async def test_a_client_not_yet_initialised_gets_tracked_once_it_knows_its_primaries(
    near: NearCache, own_cluster: ClusterDeployment, writer: RedisCluster
) -> None:
    """A RedisCluster knows no primaries before its first command: the views
    made then must start one cluster watch, not one per prefix, and aclose
    must stop it (a forgotten watch would track a closed domain for ever)."""
    client = RedisCluster(
        startup_nodes=[ClusterNode(HOST, port) for port in own_cluster.ports],
        socket_timeout=1,
        socket_connect_timeout=1,
    )
    try:
        a = near.view(client, "fresh-a:")
        near.view(client, "fresh-b:")
        near.view(client, "fresh-c:")
        watches = [t for t in asyncio.all_tasks() if "cluster watch" in t.get_name()]
        assert len(watches) == 1
        await client.initialize()
        await usable(a)
        await writer.set("fresh-a:k", b"v")
        assert await load(a, client, "fresh-a:k") == b"v"
        await near.aclose()
        await asyncio.sleep(0)
        assert all(t.done() for t in watches)
    finally:
        await client.aclose()
