"""A ``vary_on_session`` hit on Redis Cluster proves its session exists in the
lookup's own pipeline (the session key lives in another slot than the entry)."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio.cluster import RedisCluster

from asgi_redis_kit import SessionStore
from tests.cache.test_with_sessions import client_for, log_in, session_app
from tests.scaleout.conftest import cluster, cluster_client, redis_log
from tests.scaleout.servers import ClusterDeployment

pytestmark = pytest.mark.real_redis

# The scale-out fixtures, used as they are (see test_cluster_migration).
__all__ = ["cluster", "cluster_client", "redis_log"]


async def test_logged_out_and_revoked_sessions_get_no_cached_page_on_cluster(
    cluster: ClusterDeployment, cluster_client: RedisCluster
) -> None:
    prefix = f"cs{uuid.uuid4().hex[:8]}:"
    app = session_app(
        "fastapi",
        cache={"redis": cluster_client, "key_prefix": prefix + "c:"},
        session={"redis": cluster_client, "key_prefix": prefix + "s:"},
    )
    async with client_for(app) as alice, client_for(app) as thief:
        cookie = await log_in(alice, "alice")
        assert (await alice.get("/me")).headers["x-cache"] == "MISS"
        hit = await thief.get("/me", headers={"cookie": cookie})
        assert (hit.text, hit.headers["x-cache"]) == ("private page of alice", "HIT")
        await alice.get("/logout")
        replayed = await thief.get("/me", headers={"cookie": cookie})
        assert replayed.text == "private page of anonymous"

        cookie = await log_in(alice, "alice")
        await alice.get("/me")
        assert (await alice.get("/me")).headers["x-cache"] == "HIT"
        async with SessionStore(cluster_client, key_prefix=prefix + "s:") as store:
            assert await store.revoke_user("alice") == 1
        replayed = await thief.get("/me", headers={"cookie": cookie})
        assert replayed.text == "private page of anonymous"
