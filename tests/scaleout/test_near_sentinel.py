"""The near cache through a real Sentinel failover (issue 8), the whole stack.

Two app instances (CacheMiddleware + SessionMiddleware, ``near_cache=`` on),
each with its own ``Sentinel(...).master_for(...)`` client and its own
NearCache, serve one user's session and a cached page from memory. Then
Sentinel promotes the replica:

- both near caches flush (a demoted master would hear none of the new
  master's writes: its invalidations are no use);
- once A has overwritten, on the new master, the session and the page written
  before the failover, B never serves the old ones (beyond a 3 s bound for the
  invalidation to arrive, and never again after it saw the new ones);
- the trackers follow Sentinel to the new master: zero-command hits come back
  on both instances, and a later write on A still reaches B.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection

from asgi_redis_kit.near import NearCache
from tests.scaleout.apps import (
    TRACKER_COMMANDS,
    Calls,
    NearInstance,
    browser,
    ok_json,
    same_user_agent,
)
from tests.scaleout.servers import CommandLog, SentinelDeployment

# A failover takes ~12 s on an idle machine (see test_sentinel_failover.py).
pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(180)]

WITHIN = 3.0  # seconds for a write on A to reach B
RECOVERY = 30.0  # seconds after the failover for hits from memory again


@pytest.fixture
async def pair(
    sentinel_deployment: SentinelDeployment,
) -> AsyncIterator[tuple[NearInstance, NearInstance]]:
    made: list[tuple[NearInstance, Sentinel]] = []
    for calls in (Calls(), Calls(item=100)):
        log = CommandLog()
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinel_deployment.sentinel_addresses, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        master: Redis = sentinel.master_for(
            sentinel_deployment.service,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            connection_class=log.connection_class(SentinelManagedConnection),
        )
        # A short heartbeat: the tracker checks with Sentinel where the master is.
        near = NearCache(heartbeat=0.3, heartbeat_timeout=2)
        made.append((NearInstance(master, near, log, calls), sentinel))
    try:
        yield made[0][0], made[1][0]
    finally:
        for instance, sentinel in made:
            await instance.near.aclose()
            await instance.redis.aclose()  # type: ignore[union-attr]
            await sentinel.aclose()


async def from_memory(
    instance: NearInstance, agent: httpx.AsyncClient, path: str, within: float
) -> httpx.Response:
    """GET ``path`` until a request sends no command; a session route may
    answer a clean 503 meanwhile (the switch), the cache always 200."""
    deadline = time.monotonic() + within
    while True:
        instance.log.clear()
        response = await agent.get(path)
        sent = [a for _, a in instance.log.commands if a[0].upper() not in TRACKER_COMMANDS]
        if response.status_code == 200 and not sent:
            return response
        if response.status_code != 200:
            assert (path, response.status_code) == ("/show", 503), response.text
        assert time.monotonic() < deadline, (
            f"{path} not from memory within {within} s: {response.status_code} {sent[:5]} "
            f"{instance.near.stats.tracking}"
        )
        await asyncio.sleep(0.05)


async def ok(agent: httpx.AsyncClient, method: str, path: str) -> httpx.Response:
    """``path`` until it answers 200 (sessions answer 503 during the switch)."""
    deadline = time.monotonic() + RECOVERY
    while (response := await agent.request(method, path)).status_code != 200:
        assert response.status_code == 503, (path, response.status_code, response.text)
        assert time.monotonic() < deadline, f"{path} still 503 after {RECOVERY} s"
        await asyncio.sleep(0.1)
    return response


async def test_failover_flushes_never_serves_overwritten_values_and_hits_resume(
    sentinel_deployment: SentinelDeployment, pair: tuple[NearInstance, NearInstance]
) -> None:
    a, b = pair
    async with browser(a.app) as alice_a, browser(a.app) as anonymous_a:
        assert (await alice_a.get("/visits")).text == "1"
        assert (await alice_a.post("/put?when=before")).status_code == 200
        assert (await anonymous_a.get("/items/1")).headers.get("x-cache") == "MISS"
        async with same_user_agent(b.app, alice_a) as alice_b, browser(b.app) as anonymous_b:
            before = {"visits": 1, "when": "before"}
            for instance, user, anonymous in ((a, alice_a, anonymous_a), (b, alice_b, anonymous_b)):
                assert (await from_memory(instance, user, "/show", 10)).json() == before
                page = await from_memory(instance, anonymous, "/items/1", 10)
                assert page.text == "item 1 run 1", "A rendered it, B serves A's entry"
            old_page = page.text
            master, replica = sentinel_deployment.master.port, sentinel_deployment.replica.port
            deadline = time.monotonic() + 10
            while not sentinel_deployment.replica_caught_up(replica, master):
                assert time.monotonic() < deadline, "the replica never caught up"
                await asyncio.sleep(0.05)
            flushes = (a.near.stats.flushes, b.near.stats.flushes)

            old, new = await asyncio.to_thread(sentinel_deployment.failover)
            assert (old, new) == (master, replica)
            # Both flush within a few heartbeats of the switch.
            deadline = time.monotonic() + 10
            while not (a.near.stats.flushes > flushes[0] and b.near.stats.flushes > flushes[1]):
                assert time.monotonic() < deadline, "a near cache never flushed"
                await asyncio.sleep(0.05)

            # A overwrites both on the new master.
            assert (await ok(alice_a, "POST", "/put?when=after")).status_code == 200
            assert (await ok(anonymous_a, "POST", "/items/1/invalidate")).status_code == 200
            after = {"visits": 1, "when": "after"}
            assert ok_json(await ok(alice_a, "GET", "/show")) == after
            with sentinel_deployment.server(new).client() as direct:
                assert direct.info("replication")["role"] == "master"

            # B: never the old values once the bound has passed, never back to them.
            deadline = time.monotonic() + WITHIN
            while True:
                shown = await ok(alice_b, "GET", "/show")
                item = await anonymous_b.get("/items/1")
                assert item.status_code == 200, item.text
                if shown.json() == after and item.text != old_page:
                    break
                assert shown.json() in (before, after), shown.text
                assert time.monotonic() < deadline, (
                    f"B still serves the values overwritten after the failover: "
                    f"{shown.json()} {item.text!r}"
                )
                await asyncio.sleep(0.02)
            new_page = item.text
            assert new_page.startswith("item 1 run "), new_page

            # Zero-command hits on the new master, on both instances, never the old values.
            for instance, user, anonymous in ((a, alice_a, anonymous_a), (b, alice_b, anonymous_b)):
                assert (await from_memory(instance, user, "/show", RECOVERY)).json() == after
                page = await from_memory(instance, anonymous, "/items/1", RECOVERY)
                assert page.text != old_page, "the page overwritten after the failover"
            assert all(s == "tracking" for s in b.near.stats.tracking.values())

            # Tracked on the new master: a later write on A reaches B.
            assert (await ok(alice_a, "POST", "/put?when=later")).status_code == 200
            deadline = time.monotonic() + WITHIN
            while (shown := await ok(alice_b, "GET", "/show")).json() != {
                "visits": 1,
                "when": "later",
            }:
                assert shown.json() == after, shown.text
                assert time.monotonic() < deadline, f"B still shows {shown.json()}"
                await asyncio.sleep(0.02)
