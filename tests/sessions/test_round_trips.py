"""Issue 2 item 3: Redis commands and round trips per request, counted by ``spy``.

Measured (steady state, scripts already cached by Redis):

=====================================  ==========  ====================================
request                                round trips commands
=====================================  ==========  ====================================
no cookie, nothing written             0           --
no cookie, first write                 1           EVALSHA
cookie, read only                      1           HGETALL + PTTL (pipelined)
cookie, read + write                   2           HGETALL + PTTL, EVALSHA
cookie, ``await incr()``               2           HGETALL + PTTL, EVALSHA
cookie, ``regenerate()``               2           HGETALL + PTTL, DEL + EVALSHA
cookie, ``clear()``                    2           HGETALL + PTTL, DEL
login (regenerate + bind_user)         2           HGETALL + PTTL, DEL + EVALSHA x2
=====================================  ==========  ====================================
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest
from redis.asyncio import Redis

from asgi_redis_kit import SessionStore
from tests.support import RedisSpy

from .conftest import build_app, cookie_of

pytestmark = pytest.mark.real_redis


async def _warm(client: httpx.AsyncClient, spy: RedisSpy) -> None:
    """Start a session (and make sure Redis has our scripts cached), then reset."""
    await client.post("/set", json={"warm": 1})
    await client.post("/incr/counter")
    await client.post("/login/warm")
    spy.reset()


async def test_no_cookie_nothing_written_costs_nothing(
    client: httpx.AsyncClient, spy: RedisSpy
) -> None:
    response = await client.get("/read")
    assert spy.round_trips == 0
    assert spy.total == 0
    assert "set-cookie" not in response.headers


async def test_first_write_is_one_round_trip(
    client: httpx.AsyncClient, spy: RedisSpy, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    await _warm(client, spy)
    fresh = make_client(client._transport.app)  # type: ignore[attr-defined]
    await fresh.post("/set", json={"a": 1})
    assert spy.round_trips == 1
    assert dict(spy.commands) == {"EVALSHA": 1}


async def test_read_only_is_one_round_trip_and_no_write(
    client: httpx.AsyncClient, spy: RedisSpy
) -> None:
    await _warm(client, spy)
    response = await client.get("/read")
    assert response.json()["warm"] == 1
    assert spy.round_trips == 1
    assert dict(spy.commands) == {"HGETALL": 1, "PTTL": 1}
    assert "set-cookie" not in response.headers
    assert response.headers["vary"] == "Cookie"


async def test_unrelated_route_with_cookie_loads_but_never_writes(
    client: httpx.AsyncClient, spy: RedisSpy
) -> None:
    """Checklist 16: an unmodified session sends no Set-Cookie and writes nothing."""
    await _warm(client, spy)
    for _ in range(3):
        response = await client.get("/noop")
        assert "set-cookie" not in response.headers
        assert "vary" not in response.headers  # the handler never read the session
    assert spy.round_trips == 3
    assert set(spy.commands) == {"HGETALL", "PTTL"}


async def test_read_and_write_is_two_round_trips(client: httpx.AsyncClient, spy: RedisSpy) -> None:
    await _warm(client, spy)
    response = await client.post("/set", json={"b": 2})
    assert spy.round_trips == 2
    assert dict(spy.commands) == {"HGETALL": 1, "PTTL": 1, "EVALSHA": 1}
    assert "set-cookie" not in response.headers  # same id, cookie still valid


async def test_writing_the_same_value_again_is_not_a_write(
    client: httpx.AsyncClient, spy: RedisSpy
) -> None:
    await _warm(client, spy)
    await client.post("/set", json={"warm": 1})
    assert "EVALSHA" not in spy.commands
    assert spy.round_trips == 1


async def test_incr_is_two_round_trips(client: httpx.AsyncClient, spy: RedisSpy) -> None:
    await _warm(client, spy)
    response = await client.post("/incr/counter")
    assert response.text == "2"
    assert spy.round_trips == 2
    assert dict(spy.commands) == {"HGETALL": 1, "PTTL": 1, "EVALSHA": 1}


async def test_regenerate_is_two_round_trips(client: httpx.AsyncClient, spy: RedisSpy) -> None:
    await _warm(client, spy)
    response = await client.post("/regenerate")
    assert cookie_of(response)
    assert spy.round_trips == 2
    # DEL old record, SREM from the user's index, EVALSHA create new + index add.
    assert dict(spy.commands) == {"HGETALL": 1, "PTTL": 1, "DEL": 1, "SREM": 1, "EVALSHA": 2}


async def test_clear_is_two_round_trips(client: httpx.AsyncClient, spy: RedisSpy) -> None:
    await _warm(client, spy)
    response = await client.post("/logout")
    assert cookie_of(response) == ""
    assert spy.round_trips == 2
    # DEL the record and SREM it from the user's index.
    assert dict(spy.commands) == {"HGETALL": 1, "PTTL": 1, "DEL": 1, "SREM": 1}


async def test_idle_refresh_is_throttled(
    real_redis: Redis, key_prefix: str, spy: RedisSpy, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    """The TTL is refreshed at most once per tenth of the idle timeout."""
    client = make_client(build_app(real_redis, key_prefix=key_prefix, idle_timeout=3))
    await _warm(client, spy)
    for _ in range(5):
        await client.get("/read")
    assert "PEXPIRE" not in spy.commands  # fresh TTL: nothing to refresh
    await asyncio.sleep(0.5)  # more than a tenth of 3 s
    spy.reset()
    await client.get("/read")
    await client.get("/read")
    assert spy.commands["PEXPIRE"] == 1  # once, then throttled again
    assert spy.round_trips == 3


async def test_script_cache_loss_is_recovered(
    client: httpx.AsyncClient, spy: RedisSpy, real_redis: Redis
) -> None:
    """After SCRIPT FLUSH (or a Redis restart), NOSCRIPT is answered by loading the
    scripts and repeating the batch once."""
    await _warm(client, spy)
    await real_redis.script_flush()
    response = await client.post("/set", json={"after": "flush"})
    assert response.status_code == 200
    assert (await client.get("/read")).json()["after"] == "flush"


async def test_store_revoke_user_round_trips(
    client: httpx.AsyncClient, spy: RedisSpy, real_redis: Redis, key_prefix: str
) -> None:
    await _warm(client, spy)
    store = SessionStore(real_redis, key_prefix=key_prefix)
    assert await store.revoke_user("warm") == 1
    assert spy.round_trips == 2
