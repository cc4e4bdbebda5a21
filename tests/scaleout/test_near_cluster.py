"""The near cache on a real 3-master Redis Cluster, the whole stack (issue 8).

Two app instances (CacheMiddleware + SessionMiddleware, ``near_cache=`` on),
each with its own ``RedisCluster`` client, its own ``NearCache`` and its own
command log, share one cluster and one user's session cookie:

- a cached page and a session are answered from memory on both instances
  (0 commands on the request path; the trackers' own PING/CLIENT/SUBSCRIBE are
  left out, and a 60 s heartbeat keeps them quiet anyway);
- a write on A (a tag invalidation, a session write) reaches B for keys on
  different masters: B stops serving the old page / session within 3 s;
- a live migration of the slot holding a cached entry or a session record:
  during and after it B never serves a value older than a write made after the
  migration began, and afterwards the key is tracked on its new owner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.scaleout.apps import (
    Calls,
    NearInstance,
    browser,
    cluster_instance,
    entry_of,
    from_memory,
    near_tracking,
    ok_json,
    pages_on_masters,
    same_user_agent,
    session_id,
    sessions_on_masters,
    until_changed,
)
from tests.scaleout.servers import (
    HOST,
    ClusterDeployment,
    SlotMigration,
    sync_client,
)

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(120)]

WITHIN = 3.0  # seconds for a write on A to reach B (generous: it is one push)


@pytest.fixture
async def pair(cluster: ClusterDeployment) -> AsyncIterator[tuple[NearInstance, NearInstance]]:
    """Instances A and B on the shared cluster, emptied before and after."""
    cluster.flushall()
    a = await cluster_instance(cluster, Calls())
    # B's handler counts start elsewhere, so a page B renders itself never
    # reads like the one A rendered.
    b = await cluster_instance(cluster, Calls(item=100))
    try:
        yield a, b
    finally:
        for instance in (a, b):
            await instance.near.aclose()
            await instance.redis.aclose()  # type: ignore[union-attr]
        cluster.flushall()


async def test_pages_and_sessions_from_memory_and_writes_reach_the_other_instance(
    cluster: ClusterDeployment, pair: tuple[NearInstance, NearInstance]
) -> None:
    a, b = pair
    await near_tracking(a, b)
    assert set(a.near.stats.tracking) == {f"{HOST}:{port}" for port in cluster.ports}
    async with browser(a.app) as anonymous_a, browser(b.app) as anonymous_b:
        pages = await pages_on_masters(cluster, anonymous_a, 2)
        agents_a = await sessions_on_masters(cluster, a.app, 2)
        agents_b = {port: same_user_agent(b.app, agent) for port, agent in agents_a.items()}
        try:
            shown: dict[int, str] = {}
            for port, agent in agents_a.items():
                assert (await agent.post(f"/put?master={port}")).status_code == 200
                for instance, user in ((a, agent), (b, agents_b[port])):
                    page = await from_memory(instance, user, "/show")
                    assert page.json() == {"visits": 1, "master": str(port)}
                    shown[port] = page.text
            old_pages: dict[str, str] = {}
            for path in pages.values():
                for instance, agent in ((a, anonymous_a), (b, anonymous_b)):
                    page = await from_memory(instance, agent, path)
                    assert page.headers.get("x-cache") == "HIT"
                    old_pages[path] = page.text
                # Served from memory again and again: still no command.
                b.log.clear()
                for _ in range(5):
                    assert (await anonymous_b.get(path)).text == old_pages[path]
                assert b.request_commands() == []
            assert b.near.stats.hits > 0
            assert a.near.stats.hits > 0

            # Writes on A, for keys on different masters, reach B.
            for port, agent in agents_a.items():
                assert (await agent.post(f"/put?master=again{port}")).status_code == 200
                changed = await until_changed(agents_b[port], "/show", shown[port], WITHIN)
                assert changed.json() == {"visits": 1, "master": f"again{port}"}
                again = await from_memory(b, agents_b[port], "/show")
                assert again.json() == changed.json(), "B must not go back to the old record"
            for path in pages.values():
                assert (await anonymous_a.post(f"{path}/invalidate")).status_code == 200
                fresh = await until_changed(anonymous_b, path, old_pages[path], WITHIN)
                assert fresh.text.startswith(f"item {path.rsplit('/', 1)[1]} run 10")
                hit = await from_memory(b, anonymous_b, path)
                assert hit.text == fresh.text
        finally:
            for agent in [*agents_a.values(), *agents_b.values()]:
                await agent.aclose()


def other_master(cluster: ClusterDeployment, slot: int) -> int:
    owner = cluster.owner_of(slot)
    return next(port for port in cluster.ports if port != owner)


async def never_older(
    agent: httpx.AsyncClient, path: str, accept: Callable[[httpx.Response], bool], within: float
) -> httpx.Response:
    """GET ``path`` until ``accept`` holds (fail after ``within`` s); every
    answer is a 200. Returns the accepted one."""
    deadline = time.monotonic() + within
    while True:
        response = await agent.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text)
        if accept(response):
            return response
        assert time.monotonic() < deadline, f"{path} still answers {response.text!r}"
        await asyncio.sleep(0.02)


async def test_session_slot_migrated_live_never_serves_an_older_record(
    cluster: ClusterDeployment, pair: tuple[NearInstance, NearInstance]
) -> None:
    a, b = pair
    await near_tracking(a, b)
    async with browser(a.app) as alice_a:
        assert (await alice_a.get("/visits")).text == "1"
        async with same_user_agent(b.app, alice_a) as alice_b:
            assert (await alice_a.post("/put?step=0")).status_code == 200
            assert (await from_memory(b, alice_b, "/show")).json()["step"] == "0"
            key = f"ark:s:{session_id(alice_a)}"
            slot = cluster.keyslot(key)
            migration = SlotMigration(cluster, slot, other_master(cluster, slot))

            def at_least(step: int) -> Callable[[httpx.Response], bool]:
                def accept(response: httpx.Response) -> bool:
                    seen = int(response.json()["step"])
                    assert seen >= step - 1, f"B went back to step {seen} after {step}"
                    return seen == step

                return accept

            async def write_then_check(step: int) -> None:
                assert (await alice_a.post(f"/put?step={step}")).status_code == 200
                await never_older(alice_b, "/show", at_least(step), WITHIN)
                # And from then on never the one before (a few reads, some from memory).
                for _ in range(5):
                    assert int(ok_json(await alice_b.get("/show"))["step"]) == step

            migration.begin()  # MIGRATING: the key is still on the source
            await write_then_check(1)
            assert migration.move_keys() >= 1  # MIGRATE deletes it on the source
            await write_then_check(2)
            migration.finish()  # MOVED from now on
            await write_then_check(3)
            assert cluster.owner_of(slot) == migration.target
            # Tracked on its new owner: B keeps it in memory, and A's write there reaches B.
            assert (await from_memory(b, alice_b, "/show")).json()["step"] == "3"
            await write_then_check(4)
            assert (await from_memory(b, alice_b, "/show")).json() == {"visits": 1, "step": "4"}
            assert session_id(alice_b) == session_id(alice_a)
    assert a.log.error_kinds() & {"AskError", "MovedError"}, "no redirection was exercised"


async def test_cached_entry_slot_migrated_live_never_serves_an_older_page(
    cluster: ClusterDeployment, pair: tuple[NearInstance, NearInstance]
) -> None:
    a, b = pair
    await near_tracking(a, b)
    async with browser(a.app) as anonymous_a, browser(b.app) as anonymous_b:
        entry = await entry_of(cluster, anonymous_a, "/items/7")
        old = (await from_memory(b, anonymous_b, "/items/7")).text
        slot = cluster.keyslot(entry)
        migration = SlotMigration(cluster, slot, other_master(cluster, slot))
        served: list[str] = []

        async def invalidate_then_check() -> None:
            """A bumps the page's tag: B must stop serving every page it saw so far."""
            before = {old, *served}
            assert (await anonymous_a.post("/items/7/invalidate")).status_code == 200
            deadline = time.monotonic() + WITHIN
            while True:
                response = await anonymous_b.get("/items/7")
                assert response.status_code == 200, response.text
                if response.text not in before:
                    break
                assert time.monotonic() < deadline, f"B still serves {response.text!r}"
                await asyncio.sleep(0.02)
            served.append(response.text)
            for _ in range(5):
                again = await anonymous_b.get("/items/7")
                assert again.status_code == 200, again.text
                assert again.text not in before, f"B went back to {again.text!r}"

        migration.begin()
        await invalidate_then_check()
        migration.move_keys()
        await invalidate_then_check()
        migration.finish()
        await invalidate_then_check()
        assert cluster.owner_of(slot) == migration.target
        # The entry now lives (and is tracked) on its new owner: B answers it
        # from memory, and an invalidation there reaches B.
        await from_memory(b, anonymous_b, "/items/7")
        await invalidate_then_check()
        hit = await from_memory(b, anonymous_b, "/items/7")
        # A write to the entry key itself (no version moved), on the new owner:
        # only that node's tracker can tell B.
        with sync_client(migration.target) as direct:
            assert direct.delete(entry) == 1
        changed = await until_changed(anonymous_b, "/items/7", hit.text, WITHIN)
        assert changed.headers.get("x-cache") == "MISS", "B re-rendered the deleted entry"
