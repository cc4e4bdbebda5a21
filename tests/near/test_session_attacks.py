"""Attacks on the session store's near cache: ways to make ``SessionStore.load``
answer from process memory what Redis would no longer answer, or fail.

Each test says what it attacks and what the store must do. Every
test runs on a throwaway redis-server (or deployment) of its own, and is
bounded: polls give up after a few seconds."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from asgi_redis_kit import SessionStore
from asgi_redis_kit.near import NearCache
from asgi_redis_kit.sessions._record import CREATED, DATA
from asgi_redis_kit.sessions._saving import new_session_id
from tests.near.conftest import HEARTBEAT
from tests.scaleout.conftest import cluster
from tests.scaleout.servers import HOST, ClusterDeployment, SentinelDeployment, ServerStartError
from tests.support import DelayProxy, RedisProcess

from .session_app import SLACK_TIMEOUT, http, read_until_local, session_app, usable

pytestmark = pytest.mark.real_redis

__all__ = ["cluster"]  # a fixture, imported for pytest

PREFIX = "na:"


@pytest.fixture
async def raw(own_redis: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


async def new_record(store: SessionStore, ttl_ms: int = 60_000, **data: bytes) -> str:
    """A stored session (raw fields), as a first save makes it; its id."""
    session_id = new_session_id()
    fields = {CREATED: str(store.now_ms()).encode(), **{DATA + k: v for k, v in data.items()}}
    await store.save(session_id, create=True, fields=fields, ttl_ms=ttl_ms)
    return session_id


async def until_none(store: SessionStore, session_id: str, within: float) -> bool:
    """Whether ``store.load(session_id)`` answers None within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await store.load(session_id) is None:
            return True
        await asyncio.sleep(0.02)
    return False


# -- one NearCache used by several threads, each with its own event loop -------------


@pytest.mark.timeout(60)
def test_threads_each_with_its_own_loop_share_one_near_cache(own_redis: RedisProcess) -> None:
    """NearCache.shared() is process-wide and view() takes a threading lock: threads
    that each run a loop (asyncio.run per thread, async_to_sync, threaded servers)
    may share it. A small byte bound makes every put evict; a tiny switch interval
    makes the threads interleave inside the store. No load may raise."""
    near = NearCache(
        max_bytes=4000, max_entry_bytes=1000, heartbeat=HEARTBEAT, heartbeat_timeout=SLACK_TIMEOUT
    )
    store = SessionStore(own_redis.url, key_prefix=PREFIX, near_cache=near)
    errors: list[str] = []
    stop = threading.Event()

    def worker() -> None:
        async def run() -> None:
            ids = [await new_record(store, x=b"1") for _ in range(20)]
            view = store._near_view()
            assert view is not None
            deadline = time.monotonic() + 10
            while not view.usable:
                assert time.monotonic() < deadline, "never tracking"
                await asyncio.sleep(0.01)
            deadline = time.monotonic() + 15
            i = 0
            while not stop.is_set() and time.monotonic() < deadline:
                session_id = ids[i % len(ids)]
                i += 1
                record = await store.load(session_id)
                assert record is not None
                assert record.data == {"x": 1}
                if i % 7 == 0:
                    await store.touch(session_id, 60_000)  # a write: drops the copy

        try:
            asyncio.run(run())
        except BaseException:
            errors.append(traceback.format_exc())
            stop.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(40)
    finally:
        sys.setswitchinterval(interval)
        stop.set()
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


# -- a raw command from redis-cli that Redis does not announce -----------------------


async def test_swapdb_ends_the_copy(own_redis: RedisProcess, raw: Redis) -> None:
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=SLACK_TIMEOUT)
    redis = Redis.from_url(own_redis.url, socket_timeout=5)
    app = session_app(redis, PREFIX, near)
    try:
        async with http(app) as client:
            await client.post("/set", json={"x": 1})
            await client.get("/read")
            await usable(near)
            assert await read_until_local(client, near) == {"x": 1}
            # An operator swaps in another data set (db 1 is empty: "restore a
            # backup of before the login", say). Redis no longer has the session.
            await raw.swapdb(0, 1)
            assert [k async for k in raw.scan_iter(match=f"{PREFIX}*")] == []
            deadline = time.monotonic() + 2
            while (await client.get("/read")).json() != {}:
                assert time.monotonic() < deadline, "the swapped-out session is still served"
                await asyncio.sleep(0.02)
    finally:
        await near.aclose()
        await redis.aclose()


# -- two Sentinel deployments with the same service name -----------------------------


@pytest.fixture
def two_sentinels() -> Iterator[tuple[SentinelDeployment, SentinelDeployment]]:
    made: list[SentinelDeployment] = []
    try:
        for _ in range(2):
            made.append(SentinelDeployment(service="mymaster", sentinels=1))
    except ServerStartError as exc:
        for deployment in made:
            deployment.close()
        pytest.fail(f"could not start Redis Sentinel: {exc}")
    try:
        yield made[0], made[1]
    finally:
        for deployment in made:
            deployment.close()


@pytest.mark.timeout(90)
async def test_two_sentinel_deployments_of_one_service_name(
    two_sentinels: tuple[SentinelDeployment, SentinelDeployment],
) -> None:
    first, second = two_sentinels
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=SLACK_TIMEOUT)
    sentinels = [
        Sentinel(d.sentinel_addresses, socket_timeout=2)  # type: ignore[no-untyped-call]
        for d in (first, second)
    ]
    masters: list[Redis] = [s.master_for("mymaster", socket_timeout=2) for s in sentinels]
    other = SessionStore(masters[0], key_prefix="other:", near_cache=near)  # e.g. the cache's
    store = SessionStore(masters[1], key_prefix=PREFIX, near_cache=near)
    admin = SessionStore(masters[1], key_prefix=PREFIX)  # another instance, no near cache
    try:
        await other.load("nosuch")  # made the domain first: tracking on the first master
        session_id = await new_record(store, x=b"1")
        await usable(near)
        deadline = time.monotonic() + 10
        while True:  # until a load is answered from memory
            hits = near.stats.hits
            assert await store.load(session_id) is not None
            if near.stats.hits > hits:
                break
            assert time.monotonic() < deadline, "never served from memory"
            await asyncio.sleep(0.02)
        await admin.delete([(session_id, None)])  # a logout on another instance
        assert await until_none(store, session_id, 2.0), "the logged-out session is served"
    finally:
        await near.aclose()
        for master in masters:
            await master.aclose()
        for sentinel in sentinels:
            await sentinel.aclose()


# -- a client that encodes keys in something other than UTF-8 ------------------------


async def test_a_client_encoding_other_than_utf8(own_redis: RedisProcess) -> None:
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=SLACK_TIMEOUT)
    mine = Redis.from_url(own_redis.url, encoding="latin-1", socket_timeout=5)
    theirs = Redis.from_url(own_redis.url, encoding="latin-1", socket_timeout=5)
    store = SessionStore(mine, key_prefix="sé:", near_cache=near)
    admin = SessionStore(theirs, key_prefix="sé:")  # another instance
    try:
        session_id = await new_record(store, x=b"1")
        await store.load(session_id)
        await usable(near)
        deadline = time.monotonic() + 10
        while True:  # until a load is answered from memory
            hits = near.stats.hits
            assert await store.load(session_id) is not None
            if near.stats.hits > hits:
                break
            assert time.monotonic() < deadline, "never served from memory"
            await asyncio.sleep(0.02)
        await admin.delete([(session_id, None)])  # a logout on another instance
        assert await theirs.exists(store.session_key(session_id)) == 0
        assert await until_none(store, session_id, 2.0), "the logged-out session is served"
    finally:
        await near.aclose()
        await mine.aclose()
        await theirs.aclose()


# -- the entry a load keeps must not outlive the record in Redis ---------------------


async def test_the_kept_entry_ends_with_the_redis_ttl(own_redis: RedisProcess, raw: Redis) -> None:
    """The session store keeps its copy in the shared near store, where the
    response cache reads it too (``cache._near_layer._local``: any entry under the
    session's key but ABSENT proves the session alive, without asking Redis).
    ``load`` itself checks the record's deadline, counted from before the LOAD was
    sent; the entry must end no later. Replies come 0.4 s late: an entry whose
    PTTL is counted from when the reply arrived would outlive the key by that."""
    async with DelayProxy(own_redis.port) as proxy:
        near = NearCache(heartbeat=30, heartbeat_timeout=5)  # no PING to delay
        redis = Redis.from_url(proxy.url, socket_timeout=5)
        store = SessionStore(redis, key_prefix=PREFIX, near_cache=near)
        try:
            await store.load("nosuch")  # starts tracking
            await usable(near)
            session_id = await new_record(store, ttl_ms=1500, x=b"1")
            key = store.session_key(session_id)
            view = store._near_view()
            assert view is not None
            proxy.latency = 0.4
            deadline = time.monotonic() + 5
            while view.get(key) is None:  # the creation's own invalidation may refuse one
                assert time.monotonic() < deadline, "never kept"
                assert await store.load(session_id) is not None
            # Until Redis no longer has it (asked directly, not through the proxy).
            while await raw.exists(key):
                assert time.monotonic() < deadline + 5
                await asyncio.sleep(0.01)
            assert view.get(key) is None, "the entry outlives the record"
            assert await store.load(session_id) is None
        finally:
            await near.aclose()
            await redis.aclose()


# -- Redis Cluster: record, successor and index on three nodes ------------------------


def client_of(cluster: ClusterDeployment) -> RedisCluster:
    nodes = [ClusterNode(HOST, port) for port in cluster.ports]
    return RedisCluster(startup_nodes=nodes, socket_timeout=2, socket_connect_timeout=2)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["revoke_user", "logout", "login_as_another"])
async def test_on_cluster_another_instance_ends_the_copy(
    cluster: ClusterDeployment, key_prefix: str, how: str
) -> None:
    """Passes (a guard): the session's record, its successor's and the user's
    index live on different nodes, each tracked by its own connection; what
    another instance (or an admin) does to them ends this instance's copy."""
    near = NearCache(heartbeat=HEARTBEAT, heartbeat_timeout=SLACK_TIMEOUT)
    mine, theirs = client_of(cluster), client_of(cluster)
    app = session_app(mine, key_prefix, near)  # type: ignore[arg-type]
    other = session_app(theirs, key_prefix, False)  # type: ignore[arg-type]
    try:
        async with http(app) as client, http(other) as elsewhere:
            assert (await client.post("/login/alice")).status_code == 200
            await client.get("/read")
            await usable(near)
            assert await read_until_local(client, near) == {"user": "alice"}
            elsewhere.cookies = client.cookies
            if how == "revoke_user":
                async with SessionStore(theirs, key_prefix=key_prefix) as admin:
                    assert await admin.revoke_user("alice") == 1
            elif how == "logout":
                assert (await elsewhere.post("/logout")).status_code == 200
            else:
                assert (await elsewhere.post("/login/bob")).status_code == 200
            deadline = time.monotonic() + 2
            while (await client.get("/read")).json() != {}:
                assert time.monotonic() < deadline, "the ended session is still served"
                await asyncio.sleep(0.02)
            assert (await client.get("/whoami")).json()["user"] is None
    finally:
        await near.aclose()
        await mine.aclose()
        await theirs.aclose()
