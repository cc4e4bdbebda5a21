"""Over the wire with real uvicorn processes: two workers share one Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tests.support import free_port, wait_for_port

pytestmark = pytest.mark.real_redis

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workers(redis_url: str, key_prefix: str) -> Iterator[list[str]]:
    """Two uvicorn processes serving tests.cache.wire_app on their own ports."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    env = {**os.environ, "REDIS_URL": redis_url, "KEY_PREFIX": key_prefix}
    try:
        for _ in range(2):
            port = free_port()
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "uvicorn", "--factory", "tests.cache.wire_app:create",
                    "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                ],
                cwd=ROOT,
                env=env,
            )  # fmt: skip
            procs.append(proc)
            wait_for_port(port, proc)
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


async def test_200_cold_requests_across_two_processes_run_the_handler_once(
    workers: list[str], real_redis: Redis, key_prefix: str
) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    # One site served by two workers: the same Host reaches both (as behind a
    # load balancer); the port is not part of the site.
    site = {"host": "site.test"}
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=site) as client:
        # Both workers must be warm (Lua scripts loaded) only in the sense of
        # having answered once; use a route that is not cached for that.
        for url in workers:
            assert (await client.get(url + "/")).status_code == 200
        responses = await asyncio.gather(
            *(client.get(workers[n % 2] + "/report?burst=200") for n in range(200))
        )

    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1  # everyone got the one stored answer
    assert await real_redis.get(f"{key_prefix}calls:report") == b"1"
    served_by = {r.headers["x-cache"] for r in responses}
    assert served_by <= {"MISS", "HIT"}
    assert sum(r.headers["x-cache"] == "MISS" for r in responses) == 1


async def test_browser_with_a_session_cookie_sees_miss_then_hit(
    workers: list[str], real_redis: Redis
) -> None:
    """The example app's flow over the wire: the visit counter gives the browser a
    session cookie; the cached report is MISS then HIT for it, on either worker."""
    site = {"host": "site.test"}
    async with httpx.AsyncClient(base_url=workers[0], timeout=30, headers=site) as browser:
        assert (await browser.get("/")).text == "Número de visitas: 1"
        assert "session" in browser.cookies
        first = await browser.get("/report")
        second = await browser.get("/report")
        other_worker = await browser.get(workers[1] + "/report")
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert other_worker.headers["x-cache"] == "HIT"
        assert second.text == first.text == other_worker.text
        assert (await browser.get("/")).text == "Número de visitas: 2"
