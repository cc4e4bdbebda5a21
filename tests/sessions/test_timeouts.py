"""Issue 2 item 7: idle timeout (Redis TTL) and absolute lifetime (server-side
creation time), on a real Redis with short values. Sleeps leave wide margins; no
assertion depends on tight timing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from redis.asyncio import Redis

from asgi_redis_kit import SessionStore

from .conftest import build_app, session_id_of

pytestmark = pytest.mark.real_redis


async def test_idle_timeout_ends_an_unused_session_and_activity_extends_it(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Checklist 11."""
    app = build_app(real_redis, key_prefix=key_prefix, idle_timeout=2, absolute_lifetime=None)
    client = make_client(app)
    await client.post("/set", json={"a": 1})
    for _ in range(3):  # 3 s of activity, longer than the idle timeout
        await asyncio.sleep(1)
        assert (await client.get("/read")).json() == {"a": 1}
    await asyncio.sleep(2 + 1)  # idle for the timeout plus 1 s
    assert (await client.get("/read")).json() == {}


async def test_absolute_lifetime_ends_even_a_busy_session(
    real_redis: Redis, key_prefix: str, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Checklist 12: continuous activity, and still the session ends."""
    # Alive checks run until 2.5 s or so (past the idle timeout), well inside the
    # lifetime: a stalled request must not carry one past it.
    app = build_app(real_redis, key_prefix=key_prefix, idle_timeout=2, absolute_lifetime=4)
    started = time.monotonic()
    cookie = (await make_client(app).post("/set", json={"a": 1})).cookies["session"]
    # Send the cookie by hand: a cookie jar drops it at its Max-Age (rounded down to
    # the second), and this test is about what the server enforces.
    client = make_client(app, headers={"cookie": f"session={cookie}"})
    seen_alive_late = False
    while time.monotonic() - started < 2.2:
        await asyncio.sleep(0.3)
        assert (await client.post("/set", json={"tick": time.monotonic()})).status_code == 200
        data = (await client.get("/read")).json()
        assert data.get("a") == 1  # alive well inside the lifetime
        seen_alive_late = time.monotonic() - started > 2.0 or seen_alive_late
    assert seen_alive_late  # the idle timeout alone would have allowed this too...
    while time.monotonic() - started < 5.0:
        await asyncio.sleep(0.3)
        await client.get("/read")
    assert "a" not in (await client.get("/read")).json()  # ...but the lifetime did not


async def test_absolute_lifetime_is_checked_from_created_at_on_load(
    real_redis: Redis, key_prefix: str, peek: Redis, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """Even if the key were still there (TTL changed by hand), the server-side
    creation time decides."""
    app = build_app(real_redis, key_prefix=key_prefix, absolute_lifetime=3600)
    client = make_client(app)
    await client.post("/set", json={"a": 1})
    key = f"{key_prefix}{session_id_of(client.cookies['session'])}"
    await peek.hset(key, "m:created", str(int((time.time() - 3601) * 1000)))
    await peek.persist(key)
    assert (await client.get("/read")).json() == {}


async def test_ttl_never_reaches_past_the_absolute_lifetime(
    real_redis: Redis, key_prefix: str, peek: Redis
) -> None:
    clock_now = [1_000_000.0]
    store = SessionStore(
        real_redis,
        key_prefix=key_prefix,
        idle_timeout=600,
        absolute_lifetime=900,
        clock=lambda: clock_now[0],
    )
    assert store.ttl_ms(int(clock_now[0] * 1000)) == 600_000
    clock_now[0] += 500
    assert store.ttl_ms(int((clock_now[0] - 500) * 1000)) == 400_000
    assert store.cookie_max_age(int((clock_now[0] - 500) * 1000)) == 400
    clock_now[0] += 400
    assert store.ttl_ms(int((clock_now[0] - 900) * 1000)) <= 0
