"""A Cluster master dies and comes back (design: "Failure policy", "fail open").

With one of three masters killed, sessions whose slots it served answer 503
(fail closed, never a 500), and once the cluster marks itself down every session
request does; the cache keeps answering 200 from the handler. When the master
restarts and the cluster is whole again, the same app serves sessions again
without a restart (the dead master's sessions are gone: nothing is persisted).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster

from tests.scaleout.apps import Calls, browser, build_app, session_id
from tests.scaleout.servers import ClusterDeployment, wait_for

pytestmark = pytest.mark.real_redis

WINDOW = 20.0
MAX_AGENTS = 60


async def test_dead_master_fails_closed_for_sessions_open_for_cache(
    own_cluster: ClusterDeployment, own_cluster_client: RedisCluster
) -> None:
    app = build_app(own_cluster_client, Calls())
    victim = own_cluster.masters[0]
    agents: list[httpx.AsyncClient] = []
    on_victim: list[httpx.AsyncClient] = []
    elsewhere: list[httpx.AsyncClient] = []
    try:
        # Session ids are random, so which master holds a session is chance: with
        # a fixed number of agents none lands on the victim about 3% of the time.
        # Make agents until both groups have some (each one is a third likely to
        # land on the victim, so the bound is never reached in practice).
        while (len(on_victim) < 2 or len(elsewhere) < 2) and len(agents) < MAX_AGENTS:
            agent = browser(app)
            agents.append(agent)
            assert (await agent.get("/visits")).text == "1"
            key = f"ark:s:{session_id(agent)}"
            owner = own_cluster.owner_of(own_cluster.keyslot(key))
            (on_victim if owner == victim.port else elsewhere).append(agent)
        assert len(on_victim) >= 2, f"{len(on_victim)} of {len(agents)} sessions on the victim"
        assert len(elsewhere) >= 2, f"{len(elsewhere)} of {len(agents)} sessions elsewhere"

        victim.kill()
        async with browser(app) as anonymous:
            for agent in on_victim:
                response = await agent.get("/visits")
                assert response.status_code == 503, (response.status_code, response.text)
                assert "retry-after" in response.headers
                assert "set-cookie" not in response.headers
            for agent in elsewhere:
                assert (await agent.get("/visits")).status_code in (200, 503)
            cached = await anonymous.get("/items/1")
            assert cached.status_code == 200, "the cache must fail open"
            assert cached.text.startswith("item 1 run ")

            victim.start()
            await asyncio.to_thread(
                wait_for,
                "the cluster to be whole again",
                lambda: all(own_cluster._state_ok(m) for m in own_cluster.masters),
                15,
            )
            deadline = time.monotonic() + WINDOW
            for agent in elsewhere:
                while (response := await agent.get("/visits")).status_code != 200:
                    assert response.status_code == 503, (response.status_code, response.text)
                    assert time.monotonic() < deadline, "sessions did not recover"
                    await asyncio.sleep(0.2)
                assert int(response.text) >= 2, "a live master's session kept its count"
            async with browser(app) as newcomer:
                while (response := await newcomer.get("/visits")).status_code != 200:
                    assert time.monotonic() < deadline, "new sessions did not recover"
                    await asyncio.sleep(0.2)
                assert response.text == "1"
            assert (await anonymous.get("/items/2")).status_code == 200
    finally:
        for agent in agents:
            await agent.aclose()
