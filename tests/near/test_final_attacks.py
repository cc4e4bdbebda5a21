"""Attacks on the final review's changes to the near cache."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from asgi_redis_kit.near import NearCache
from tests.near.conftest import usable
from tests.scaleout.conftest import own_cluster
from tests.scaleout.servers import HOST, ClusterDeployment

pytestmark = pytest.mark.real_redis

__all__ = ["own_cluster"]  # fixture, imported for pytest

PREFIX = "near:"


def _near_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if not t.done() and "near" in t.get_name().lower()]


@pytest.mark.timeout(60)
async def test_cluster_clients_made_and_closed_in_turn_do_not_pile_up_domains(
    near: NearCache, own_cluster: ClusterDeployment
) -> None:
    """Since a Cluster domain's identity holds id(client) (near/_domain.py
    _compute_identity), each new RedisCluster object of the same cluster gets
    a domain of its own, with a tracker per primary and a watch task. Nothing
    ends a domain when its client is closed (the domain holds the client, its
    trackers their own connections), so an app or test suite that makes and
    closes one cluster client after another on one long-lived loop keeps every
    domain's tasks and connections forever. Before, the same startup nodes
    shared one domain."""
    rounds = 4
    after_first = 0
    for i in range(rounds):
        client = RedisCluster(
            startup_nodes=[ClusterNode(HOST, port) for port in own_cluster.ports],
            socket_timeout=1,
            socket_connect_timeout=1,
        )
        await client.initialize()
        try:
            await usable(near.view(client, PREFIX))
        finally:
            await client.aclose()
        if i == 0:
            after_first = len(_near_tasks())
    await asyncio.sleep(0.2)
    assert after_first > 0
    # One client alive at a time: the near cache should not hold more tasks
    # than it did for one.
    assert len(_near_tasks()) <= after_first, (
        f"{len(_near_tasks())} near-cache tasks after {rounds} closed clients "
        f"(one client: {after_first}); domains: {len(near._domains)}"
    )
