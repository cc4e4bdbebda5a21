"""The response cache on a real 3-master Redis Cluster (cache issue item 7).

The cache fails open, so a CROSSSLOT would not show as an error page: it would
show as a MISS where a HIT was due, as a handler that runs too often, and in the
cache's own error counter. All three are checked, plus the raw error replies.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster

from tests.scaleout.apps import Calls, browser, build_app, ok_json
from tests.scaleout.servers import ClusterDeployment, CommandLog, hash_tag
from tests.support import Arrivals

pytestmark = pytest.mark.real_redis


async def fetch(client: httpx.AsyncClient, path: str) -> tuple[str, str]:
    response = await client.get(path)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.headers.get("x-cache", ""), response.text


async def assert_no_backend_errors(
    client: httpx.AsyncClient, log: CommandLog, cluster: ClusterDeployment
) -> None:
    spanning = [a[:3] for a, slots in cluster.multi_key_commands(log) if len(set(slots)) > 1]
    assert spanning == [], f"commands whose keys span slots: {spanning}"
    stats = ok_json(await client.get("/cache/stats"))
    assert stats["errors"] == 0, f"the cache hit Redis errors (failing open hides them): {stats}"
    assert log.bad_errors() == [], f"error replies from the cluster: {log.bad_errors()}"
    assert not log.names() & {"KEYS", "SCAN"}, "the cache scanned the keyspace"


async def test_miss_hit_tags_and_namespace_clear(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    calls = Calls()
    async with browser(build_app(cluster_client, calls, cache_timeout=5)) as client:
        items = [str(n) for n in range(1, 9)]
        for item in items:
            assert (await fetch(client, f"/items/{item}"))[0] == "MISS"
        for item in items:
            assert (await fetch(client, f"/items/{item}"))[0] == "HIT"
        assert calls["item"] == len(items)

        # Entries and their lease locks carry a hash tag; the entries spread out.
        keys = cluster.all_keys()
        assert all(hash_tag(k) is not None for k in keys), [k for k in keys if not hash_tag(k)]
        entry_owners = {cluster.owner_of(cluster.keyslot(k)) for k in keys if ":e:" in k}
        assert len(entry_owners) >= 2, "8 URLs should not all hash to one master"

        assert (await client.post("/items/3/invalidate")).status_code == 200
        cache, body = await fetch(client, "/items/3")
        assert cache == "MISS", "a tag invalidation must drop the tagged entry"
        assert body == f"item 3 run {len(items) + 1}"
        assert (await fetch(client, "/items/4"))[0] == "HIT", "other tags are untouched"

        assert (await client.post("/cache/clear")).status_code == 200
        for item in items:
            assert (await fetch(client, f"/items/{item}"))[0] == "MISS", "clear() drops all"
        for item in items:
            assert (await fetch(client, f"/items/{item}"))[0] == "HIT"
        await assert_no_backend_errors(client, redis_log, cluster)


async def test_stampede_runs_the_handler_once_across_two_workers(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    """Two app instances (two single-flight tables, as in two processes) share the
    cluster: only the Redis lease lock can keep the handler to one run."""
    calls, gate = Calls(), asyncio.Event()
    worker_a, worker_b = (
        Arrivals(build_app(cluster_client, calls, cache_timeout=5, gate=gate)) for _ in range(2)
    )

    async def open_gate() -> None:
        # The whole burst is in flight: one that had not found the lease by now
        # finds the stored entry.
        await asyncio.gather(worker_a.reach(15), worker_b.reach(15))
        gate.set()

    async with browser(worker_a) as a, browser(worker_b) as b:
        opener = asyncio.create_task(open_gate())
        results = await asyncio.gather(*(fetch(c, "/slow") for c in [a, b] * 15))
        await opener
        assert calls["slow"] == 1, f"handler ran {calls['slow']} times for one cold key"
        assert {body for _, body in results} == {"slow run 1"}
        assert {cache for cache, _ in results} <= {"MISS", "HIT"}
        lease_keys = [k for k in cluster.all_keys() if ":l:" in k]
        assert lease_keys == [], f"the lease lock was not released: {lease_keys}"
        await assert_no_backend_errors(a, redis_log, cluster)
        await assert_no_backend_errors(b, redis_log, cluster)
