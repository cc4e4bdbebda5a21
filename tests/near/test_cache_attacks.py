"""Attacks on the response cache's near layer (``cache._near_layer``): each
test tries to make a lookup answered from process memory serve what Redis
would no longer serve (a page invalidated elsewhere, another deployment's
keys, ...). Real Redis throughout; every test is bounded."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.cluster import LoadBalancingStrategy

from asgi_redis_kit import Cache, NearCache
from asgi_redis_kit.cache._entry import Entry, content_etag
from asgi_redis_kit.cache._keys import CacheKey
from tests.near.cache_app import http, make_app, near_ready
from tests.scaleout.servers import HOST, SentinelDeployment, ServerProcess, _Deployment, wait_for
from tests.support import free_port, http_scope

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


def page_key(cache: Cache, path: str = "/page") -> CacheKey:
    return cache.keys.for_request(
        http_scope(path),
        namespace=cache.namespace,
        host="testserver",
        vary=(),
        session_cookie_name="session",
        vary_on_session=False,
        tags=("page",),
        custom=None,
    )


def entry(body: bytes, versions: tuple[int, ...]) -> Entry:
    return Entry(
        status=200,
        headers=((b"content-type", b"text/plain"),),
        body=body,
        etag=content_etag(body),
        stored_at=time.time(),
        fresh_for=60,
        stale_while_revalidate=0,
        stale_if_error=0,
        versions=versions,
        per_user=False,
    )


async def stored_and_kept(cache: Cache, key: CacheKey, body: bytes) -> None:
    """Store ``body`` under ``key``, then look it up until memory answers."""
    found = await cache.lookup(key, lease=True)
    assert found.entry is None
    await cache.store(key, entry(body, found.versions), found.token)
    for _ in range(200):
        hits = cache.stats.near_hits
        found = await cache.lookup(key)
        assert found.entry is not None
        assert found.entry.body == body
        if cache.stats.near_hits > hits:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the entry is never answered from memory")


@pytest.mark.timeout(120)
async def test_two_sentinel_deployments_with_one_service_name_are_not_one_server(
    key_prefix: str,
) -> None:
    """A session store on one Sentinel-managed Redis and the cache on another,
    both named ``mymaster`` (Sentinel's default) and sharing one NearCache: the
    cache's copies must be invalidated by writes on *its* master."""
    first = await asyncio.to_thread(SentinelDeployment, "mymaster")
    try:
        second = await asyncio.to_thread(SentinelDeployment, "mymaster")
    except BaseException:
        first.close()
        raise
    sentinels = [
        Sentinel(d.sentinel_addresses, socket_timeout=2, socket_connect_timeout=2)  # type: ignore[no-untyped-call]
        for d in (first, second)
    ]
    sessions_redis, cache_redis = (s.master_for("mymaster", socket_timeout=2) for s in sentinels)
    near = NearCache(heartbeat=0.2, heartbeat_timeout=1)
    cache = Cache(cache_redis, key_prefix=key_prefix + "c:", timeout=2, near_cache=near)
    other = Redis(host="127.0.0.1", port=second.master_port(), socket_timeout=2)
    try:
        # The session store's view (it makes it on its first load).
        near.view(sessions_redis, key_prefix + "s:")
        await near_ready(cache)
        key = page_key(cache)
        await stored_and_kept(cache, key, b"one")
        # Another instance invalidates the tag on the cache's own Redis.
        await other.incr(key.tag_versions[0])
        await asyncio.sleep(1.0)  # far more than any invalidation's delivery
        found = await cache.lookup(key)
        assert found.entry is None, "served a page invalidated on the cache's own Redis"
    finally:
        await cache.aclose()
        await near.aclose()
        await other.aclose()
        for client in (sessions_redis, cache_redis):
            await client.aclose()
        for sentinel in sentinels:
            await sentinel.aclose()
        await asyncio.to_thread(first.close)
        await asyncio.to_thread(second.close)


class ReplicatedCluster(_Deployment):
    """A Redis Cluster of one master (every slot) and one replica of it."""

    def __init__(self) -> None:
        super().__init__("ark-cluster-replica-")
        try:
            self.bus = {"master": free_port(), "replica": free_port()}
            self.master = self._node("master")
            self.replica = self._node("replica")
            with self.master.client() as master:
                master.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
                master.execute_command(
                    "CLUSTER", "MEET", HOST, self.replica.port, self.bus["replica"]
                )
                found = master.execute_command("CLUSTER", "MYID")
            self.master_id = found.decode() if isinstance(found, bytes) else str(found)
            wait_for("the replica to meet the master", self._met, timeout=20)
            with self.replica.client() as replica:
                replica.execute_command("CLUSTER", "REPLICATE", self.master_id)
            wait_for("the replica to serve the slots", self._ready, timeout=20, interval=0.1)
        except BaseException:
            self.close()
            raise

    def _node(self, name: str) -> ServerProcess:
        args = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus[name]),
            "--cluster-node-timeout", "3000",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        return self._add(name, args)

    def _met(self) -> bool:
        with self.replica.client() as replica:
            nodes = replica.execute_command("CLUSTER", "NODES")
        return self.master_id in (nodes.decode() if isinstance(nodes, bytes) else str(nodes))

    def _ready(self) -> bool:
        with self.replica.client() as replica:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        with self.master.client() as master:
            slots = master.execute_command("CLUSTER", "SLOTS")
        return bool(slots) and len(slots[0]) >= 4  # range, master, replica


@pytest.mark.timeout(120)
async def test_reads_from_a_lagging_replica_are_never_kept(key_prefix: str) -> None:
    """A cluster client that reads from replicas: the tracker (on the primary)
    hears a write's invalidation at once, and a lookup right after it reads a
    replica that has not applied the write yet. What it read must not be kept:
    no invalidation ever comes for it (the replica catching up is no write on
    the primary), so memory would serve the invalidated page for ``max_ttl``."""
    deployment = await asyncio.to_thread(ReplicatedCluster)
    client = RedisCluster(
        host=HOST,
        port=deployment.master.port,
        load_balancing_strategy=LoadBalancingStrategy.RANDOM_REPLICA,
        socket_timeout=2,
    )
    near = NearCache(heartbeat=0.2, heartbeat_timeout=1)
    cache = Cache(client, key_prefix=key_prefix, timeout=2, near_cache=near)
    primary = Redis(host=HOST, port=deployment.master.port, socket_timeout=2)
    replica = Redis(host=HOST, port=deployment.replica.port, socket_timeout=2)
    try:
        await client.initialize()
        if cache.near_cache is not None:
            await near_ready(cache, 20)
        key = page_key(cache)
        found = await cache.lookup(key, lease=True)
        await cache.store(key, entry(b"one", found.versions), found.token)
        for _ in range(200):
            found = await cache.lookup(key)
            if found.entry is not None and (cache.near_cache is None or cache.stats.near_hits):
                break
            await asyncio.sleep(0.02)
        assert found.entry is not None
        assert found.entry.body == b"one"
        # The replica stops applying the primary's writes for a while.
        await replica.client_pause(1500, all=False)  # WRITE: replication paused too
        await primary.incr(key.tag_versions[0])  # another instance's invalidate_tags
        await asyncio.sleep(0.3)  # its invalidation has arrived
        await cache.lookup(key)  # reads the replica: the old version
        await asyncio.sleep(2.5)  # the replica has caught up
        found = await cache.lookup(key)
        assert found.entry is None, "serves the invalidated page after the replica caught up"
    finally:
        await cache.aclose()
        await near.aclose()
        await client.aclose()
        await primary.aclose()
        await replica.aclose()
        await asyncio.to_thread(deployment.close)


@pytest.mark.parametrize("near_cache", [True, False], ids=["near", "plain"])
async def test_a_foreign_value_in_a_version_key_is_no_500(
    redis_url: str, key_prefix: str, near_cache: bool
) -> None:
    """Someone else's value in one of our version keys (a prefix shared by
    mistake, a hand-made SET): the page is served uncached, never a 500; the
    near layer already declines to keep it, and the Redis layer must not
    fail on it either."""
    redis = Redis.from_url(redis_url, socket_timeout=5)
    near = NearCache(heartbeat=0.2, heartbeat_timeout=1)
    cache = Cache(redis, key_prefix=key_prefix, timeout=5, near_cache=near if near_cache else False)
    calls: Counter[str] = Counter()
    try:
        if near_cache:
            await near_ready(cache)
        await redis.set(page_key(cache).url_version, b"not a number", px=30_000)
        async with http(make_app(cache, calls)) as client:
            for _ in range(2):
                response = await client.get("/page")
                assert response.status_code == 200, response.text
                assert response.headers["x-cache"] != "HIT"
        assert calls["page"] == 2
    finally:
        await cache.aclose()
        await near.aclose()
        keys = [k async for k in redis.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
