"""Sessions and the cache through a Sentinel failover (checklist 36).

The app gets ``Sentinel(...).master_for("mymaster")`` as ``redis=``. While a
background client keeps reading its session and a cached page, Sentinel
promotes the replica. Within a bounded window the app works again without a
restart, the session written (and replicated) before the failover is intact,
sessions answer 503 at worst during the switch (fail closed), the cache always
answers 200 (fail open), and no READONLY ever becomes a 500.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from redis.asyncio import Redis

from tests.scaleout.apps import Calls, browser, build_app, ok_json
from tests.scaleout.servers import CommandLog, SentinelDeployment

pytestmark = pytest.mark.real_redis

RECOVERY_WINDOW = 20.0  # seconds; generous, Sentinel usually needs about one


async def until_ok(client: httpx.AsyncClient, method: str, path: str) -> httpx.Response:
    """Retry ``path`` until it answers 200, or fail after ``RECOVERY_WINDOW``."""
    deadline = time.monotonic() + RECOVERY_WINDOW
    seen: list[int] = []
    while True:
        response = await client.request(method, path)
        if response.status_code == 200:
            return response
        seen.append(response.status_code)
        assert response.status_code == 503, (path, response.status_code, response.text)
        assert time.monotonic() < deadline, f"{path} still failing after the window: {seen}"
        await asyncio.sleep(0.1)


class Traffic:
    """Keeps requesting the session and the cached page, and keeps every answer."""

    def __init__(self, app: httpx.AsyncClient, anonymous: httpx.AsyncClient) -> None:
        self.app = app
        self.anonymous = anonymous
        self.session: list[tuple[int, str]] = []
        self.cache: list[tuple[int, str]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            r = await self.app.get("/show")
            self.session.append((r.status_code, r.text))
            r = await self.anonymous.get("/items/1")
            self.cache.append((r.status_code, r.text))
            await asyncio.sleep(0.02)


async def test_failover_keeps_sessions_and_never_leaks_readonly(
    sentinel_deployment: SentinelDeployment, sentinel_master: Redis, redis_log: CommandLog
) -> None:
    calls = Calls()
    app = build_app(sentinel_master, calls)
    async with browser(app) as alice, browser(app) as anonymous:
        for expected in ("1", "2", "3"):
            assert (await alice.get("/visits")).text == expected
        assert (await alice.post("/put?name=alice&cart=3")).status_code == 200
        assert (await anonymous.get("/items/1")).headers.get("x-cache") == "MISS"
        written = {"visits": 3, "name": "alice", "cart": "3"}
        assert ok_json(await alice.get("/show")) == written

        master, replica = sentinel_deployment.master.port, sentinel_deployment.replica.port
        deadline = time.monotonic() + 10
        while not sentinel_deployment.replica_caught_up(replica, master):
            assert time.monotonic() < deadline, "the replica never caught up"
            await asyncio.sleep(0.05)

        traffic = Traffic(alice, anonymous)
        task = asyncio.create_task(traffic.run())
        try:
            await asyncio.sleep(0.2)
            old, new = await asyncio.to_thread(sentinel_deployment.failover)
            assert (old, new) == (master, replica)
            # The app is not restarted: the same client must find the new master.
            assert ok_json(await until_ok(alice, "GET", "/show")) == written
            visits = await until_ok(alice, "GET", "/visits")
            assert visits.text == "4", "the first write after failover lands on the new master"
            await asyncio.sleep(0.3)
        finally:
            traffic.stop.set()
            await task

        assert ok_json(await alice.get("/show")) == {**written, "visits": 4}
        with sentinel_deployment.server(new).client() as direct:
            assert direct.info("replication")["role"] == "master"

    session_statuses = {status for status, _ in traffic.session}
    assert session_statuses <= {200, 503}, f"sessions answered {session_statuses}"
    after = {**written, "visits": 4}
    seen = [json.loads(text) for status, text in traffic.session if status == 200]
    assert all(data in (written, after) for data in seen), "a read returned other data"
    cache_statuses = {status for status, _ in traffic.cache}
    assert cache_statuses == {200}, f"the cache must fail open, it answered {cache_statuses}"
    assert all(text.startswith("item 1 run ") for _, text in traffic.cache)
    assert len(traffic.session) >= 5, "the background traffic barely ran"
    leaked = [text for _, text in traffic.session + traffic.cache if "READONLY" in text]
    assert leaked == [], f"READONLY reached a client: {leaked[:3]}"
