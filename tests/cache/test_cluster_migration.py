"""The cache on Redis Cluster while an entry's slot migrates (the scale-out
suite's cluster, reused through its fixtures).

During a migration Redis answers a multi-key command whose keys are not all on
one node with TRYAGAIN, which redis-py retries until it gives up; a cache that
sent MGET (or a two-key script) there would fail open - BYPASS or an unstored
MISS, counted as a backend error that feeds the breaker. Single-key commands
only get ASK, which redis-py follows. So: hits stay hits, misses are stored,
and the cache sees no error at any step of the move.
"""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from asgi_redis_kit import Cache
from tests.cache.conftest import Calls, build, client_for
from tests.scaleout.conftest import cluster, cluster_client, redis_log
from tests.scaleout.servers import ClusterDeployment, CommandLog, SlotMigration

pytestmark = pytest.mark.real_redis

# The scale-out fixtures, used here as they are (pytest finds them by name). Run
# together with tests/scaleout, this module gets its own instance of the
# session-scoped cluster (a fixture's scope is per definition site).
__all__ = ["cluster", "cluster_client", "redis_log"]


async def test_hits_and_misses_survive_moving_the_entry_slot(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    # A generous deadline: a call that misses it fails open and counts as an error.
    cache = Cache(cluster_client, key_prefix="mig:", timeout=5)
    calls = Calls()
    async with client_for(build("starlette", cache, calls)) as client:
        first = await client.get("/items/7")
        assert first.headers["x-cache"] == "MISS"
        entries = [k for k in cluster.all_keys() if ":e:" in k]
        assert len(entries) == 1, entries
        slot = cluster.keyslot(entries[0])
        target = next(p for p in cluster.ports if p != cluster.owner_of(slot))
        migration = SlotMigration(cluster, slot, target)

        # The query is not part of the URL id, so ?q=... is another entry in the
        # same (migrating) slot: a miss that must take the lease and be stored.
        migration.begin()  # MIGRATING: the entry is on the source, the rest is not
        assert (await client.get("/items/7")).headers["x-cache"] == "HIT"
        assert (await client.get("/items/7?q=a")).headers["x-cache"] == "MISS"
        assert (await client.get("/items/7?q=a")).headers["x-cache"] == "HIT"

        assert migration.move_keys() >= 1  # every key on the target: the source says ASK
        assert (await client.get("/items/7")).headers["x-cache"] == "HIT"
        assert (await client.get("/items/7?q=b")).headers["x-cache"] == "MISS"
        assert (await client.get("/items/7?q=b")).headers["x-cache"] == "HIT"

        migration.finish()
        again = await client.get("/items/7")
        assert (again.headers["x-cache"], again.text) == ("HIT", first.text)
    assert calls["item"] == 3
    assert cache.stats.errors == 0, cache.stats.as_dict()
    assert not cache.stats.bypass, cache.stats.as_dict()
    assert not cache.stats.not_stored, cache.stats.as_dict()
    assert cache.breaker.state == "closed"
    assert redis_log.error_kinds() & {"AskError", "MovedError"}, "no redirection was exercised"
    assert "TryAgainError" not in redis_log.error_kinds(), redis_log.errors
    assert [k for k in cluster.all_keys() if ":l:" in k] == [], "a lease was left behind"
    await cache.aclose()
