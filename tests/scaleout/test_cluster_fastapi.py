"""The same middleware from a FastAPI app on the real Redis Cluster."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from tests.scaleout.apps import Calls, browser, build_fastapi_app, ok_json
from tests.scaleout.servers import ClusterDeployment, CommandLog

pytestmark = pytest.mark.real_redis


async def test_fastapi_sessions_and_cache_on_cluster(
    cluster: ClusterDeployment, cluster_client: RedisCluster, redis_log: CommandLog
) -> None:
    calls = Calls()
    app = build_fastapi_app(cluster_client, calls)
    async with browser(app) as alice, browser(app) as anonymous:
        assert [(await alice.get("/visits")).text for _ in range(3)] == ["1", "2", "3"]
        assert (await alice.post("/login/frank")).status_code == 200
        assert (await alice.get("/visits")).text == "4", "login keeps the data"
        assert ok_json(await alice.get("/users/frank/sessions")) == {"count": 1}

        first = await anonymous.get("/items/5")
        assert (first.headers.get("x-cache"), first.json()) == ("MISS", {"id": 5, "run": 1})
        hit = await anonymous.get("/items/5")
        assert (hit.headers.get("x-cache"), hit.json()) == ("HIT", {"id": 5, "run": 1})
        assert calls["dependency"] == 1, "a hit runs no dependency"
        assert ok_json(await anonymous.post("/items/5/invalidate")) == {"bumped": 1}
        again = await anonymous.get("/items/5")
        assert (again.headers.get("x-cache"), again.json()) == ("MISS", {"id": 5, "run": 2})

        assert ok_json(await anonymous.get("/cache/stats"))["errors"] == 0
    spanning = [a[:3] for a, slots in cluster.multi_key_commands(redis_log) if len(set(slots)) > 1]
    assert spanning == [], f"commands whose keys span slots: {spanning}"
    assert redis_log.bad_errors() == [], f"error replies: {redis_log.bad_errors()}"
