"""The races of tests/sessions/test_revoke_races.py on a real 3-master Cluster,
where the session, its replacement and the user index all live in different
slots, and nodes run what they get in no order relative to each other."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from tests.scaleout.servers import HOST, ClusterDeployment
from tests.sessions.test_revoke_races import (
    PausingCluster,
    login_between_revokes_take_and_delete,
    race,
    unraced,
)

pytestmark = pytest.mark.real_redis


@pytest.fixture
async def pausing(
    cluster: ClusterDeployment, cluster_client: RedisCluster
) -> AsyncIterator[PausingCluster]:
    client = PausingCluster(
        startup_nodes=[ClusterNode(HOST, port) for port in cluster.ports], socket_timeout=2
    )
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize("op", ["regenerate", "login", "login-as-bob", "rebind", "incr", "write"])
async def test_revoke_wins_over_a_request_in_flight(
    cluster_client: RedisCluster, key_prefix: str, op: str
) -> None:
    await race(cluster_client, cluster_client, key_prefix, op, "revoke")


@pytest.mark.parametrize("op", ["regenerate", "login"])
async def test_logout_wins_over_a_login_in_flight(
    cluster_client: RedisCluster, key_prefix: str, op: str
) -> None:
    await race(cluster_client, cluster_client, key_prefix, op, "logout")


async def test_the_control_keeps_its_sessions(
    cluster_client: RedisCluster, key_prefix: str
) -> None:
    await unraced(cluster_client, cluster_client, key_prefix)


async def test_a_login_racing_revoke_user_is_revoked_too(
    cluster_client: RedisCluster, pausing: PausingCluster, key_prefix: str
) -> None:
    await login_between_revokes_take_and_delete(cluster_client, pausing, cluster_client, key_prefix)
