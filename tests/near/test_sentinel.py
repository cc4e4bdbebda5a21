"""Sentinel: the tracker follows the master, and a failover is a loss of tracking.

A demoted master still answers PING, and until Sentinel reconfigures it (seconds
later) it receives none of the new master's writes: a tracker left there would
hear of nothing. So every heartbeat asks Sentinel where the master is."""

from __future__ import annotations

import asyncio

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from asgi_redis_kit.near import NearCache
from tests.near.conftest import load, until, usable
from tests.scaleout.conftest import redis_log, sentinel_deployment, sentinel_master
from tests.scaleout.servers import HOST, SentinelDeployment

pytestmark = pytest.mark.real_redis

__all__ = ["redis_log", "sentinel_deployment", "sentinel_master"]  # fixtures, for pytest

KEY = "near:s:k"


def trackers_on(port: int) -> int:
    with sync_redis.Redis(host=HOST, port=port, socket_timeout=5) as client:
        return sum(1 for c in client.client_list(_type="pubsub") if "t" in c["flags"])


async def test_a_failover_moves_tracking_to_the_new_master(
    near: NearCache, sentinel_deployment: SentinelDeployment, sentinel_master: Redis
) -> None:
    view = await usable(near.view(sentinel_master, "near:"))
    assert near.stats.tracking == {f"sentinel:{sentinel_deployment.service}": "tracking"}
    old_port = sentinel_deployment.master_port()
    assert await asyncio.to_thread(trackers_on, old_port) == 1
    await sentinel_master.set(KEY, b"old")
    assert await load(view, sentinel_master, KEY) == b"old"

    flushes = near.stats.flushes
    old, new = await asyncio.to_thread(sentinel_deployment.failover, wait_for_demotion=False)
    assert old == old_port
    # Within a heartbeat or two the tracker notices, flushes, and tracks the new master.
    await until(lambda: near.stats.flushes > flushes, 10)
    await until(lambda: trackers_on(new) == 1, 10)
    await usable(view)
    assert view.get(KEY) is None
    direct = Redis(host=HOST, port=new, socket_timeout=5)
    try:
        await direct.set(KEY, b"new")
        assert await load(view, direct, KEY) == b"new"
        await direct.set(KEY, b"newer")
        await until(lambda: view.get(KEY) is None, 5)
    finally:
        await direct.aclose()


async def test_swapdb_on_the_master_is_noticed_through_sentinel(
    near: NearCache, sentinel_deployment: SentinelDeployment, sentinel_master: Redis
) -> None:
    """The SWAPDB probe must reach the master Sentinel names, as the tracker
    does (a probe left on the client's default host would count another
    server's SWAPDBs)."""
    view = await usable(near.view(sentinel_master, "near:"))
    direct = Redis(host=HOST, port=sentinel_deployment.master_port(), db=1, socket_timeout=5)
    try:
        # db 1 first: tracking is keyspace-wide, so this write invalidates db 0's key too.
        await direct.set(KEY, b"rebuilt")
        await sentinel_master.set(KEY, b"old")
        assert await load(view, sentinel_master, KEY) == b"old"
        await direct.swapdb(0, 1)
        assert await sentinel_master.get(KEY) == b"rebuilt"
        await until(lambda: view.get(KEY) is None, 5)
    finally:
        await direct.swapdb(0, 1)
        await direct.aclose()
