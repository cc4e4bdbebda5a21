"""Fixtures for the scale-out tests: a real Redis Cluster and a real Sentinel setup.

The cluster (3 masters) is started once per test session and flushed between
tests; a Sentinel deployment (master, replica, one Sentinel) is started per test
because failover tests change who the master is. A server that cannot start
fails the test with the reason; it is never skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection

from tests.scaleout.servers import (
    HOST,
    ClusterDeployment,
    CommandLog,
    SentinelDeployment,
    ServerStartError,
)

pytestmark = pytest.mark.real_redis


def _cluster() -> Iterator[ClusterDeployment]:
    try:
        deployment = ClusterDeployment(masters=3)
    except ServerStartError as exc:
        pytest.fail(f"could not start a Redis Cluster for the scale-out tests: {exc}")
    try:
        yield deployment
    finally:
        deployment.close()


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterDeployment]:
    yield from _cluster()


@pytest.fixture
def redis_log() -> CommandLog:
    """Every command the library's client sends, and every error reply it gets."""
    return CommandLog()


@pytest.fixture
async def cluster_client(
    cluster: ClusterDeployment, redis_log: CommandLog
) -> AsyncIterator[RedisCluster]:
    """A ``RedisCluster`` client on the shared cluster, recorded by ``redis_log``.

    Tests start from an empty cluster (all slots back on their original owners
    is not needed: the client follows MOVED on its own)."""
    cluster.flushall()
    client = RedisCluster(
        startup_nodes=[ClusterNode(HOST, port) for port in cluster.ports],
        socket_timeout=2,
        socket_connect_timeout=2,
    )
    recording = redis_log.connection_class()
    client.connection_kwargs["connection_class"] = recording
    for node in client.startup_nodes:
        node.connection_class = recording
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()
        cluster.flushall()


@pytest.fixture
def sentinel_deployment() -> Iterator[SentinelDeployment]:
    try:
        deployment = SentinelDeployment(service="mymaster", sentinels=1)
    except ServerStartError as exc:
        pytest.fail(f"could not start Redis Sentinel for the scale-out tests: {exc}")
    try:
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
async def sentinel_master(
    sentinel_deployment: SentinelDeployment, redis_log: CommandLog
) -> AsyncIterator[Redis]:
    """``Sentinel(...).master_for("mymaster")``: the client apps pass as ``redis=``."""
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinel_deployment.sentinel_addresses, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    master: Redis = sentinel.master_for(
        sentinel_deployment.service,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        connection_class=redis_log.connection_class(SentinelManagedConnection),
    )
    try:
        yield master
    finally:
        await master.aclose()
        await sentinel.aclose()


@pytest.fixture
def own_cluster() -> Iterator[ClusterDeployment]:
    """A cluster of this test's own, for killing and restarting masters."""
    yield from _cluster()


@pytest.fixture
async def own_cluster_client(own_cluster: ClusterDeployment) -> AsyncIterator[RedisCluster]:
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
