"""Issue 2 item 3: Redis commands and round trips per request, counted by ``spy``.

Measured (steady state, scripts already cached by Redis):

=====================================  ==========  ====================================
request                                round trips commands
=====================================  ==========  ====================================
no cookie, nothing written             0           --
no cookie, first write                 1           EVALSHA
cookie, read only                      1           EVALSHA (load: HGETALL + PTTL)
cookie, read + write                   2           EVALSHA, EVALSHA (+ EVALSHA pipelined
                                                   when bound: keep the index's TTL)
cookie, ``await incr()``               2           EVALSHA, EVALSHA
cookie, ``regenerate()`` of a bound    4           EVALSHA, EVALSHA x2 (create + index add
session (same user: a rotation)                    unless a revoke is under way,
                                                   pipelined), EVALSHA (delete the old one
                                                   if still live), SREM (un-index it)
cookie, ``clear()``                    2           EVALSHA, EVALSHA + SREM (delete, and
                                                   un-index, pipelined)
login as another user, or from an      3           EVALSHA, EVALSHA x3 (create, index add,
anonymous session                                  delete the old one if still live:
                                                   pipelined), SREM

The load is one script that returns the hash and its TTL, so a read-only request
is one command; a batch of one command skips redis-py's pipeline. A regenerated
session is created before the old one is deleted, and only kept if the old one was
still live then (revoke and logout win over a login in flight): one round trip
more than writing both at once. On Cluster each ordered step of a save is its own
round trip (see the _store module docstring).
=====================================  ==========  ====================================
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from asgi_redis_kit import SessionStore
from tests.support import RedisSpy

from .conftest import build_app, cookie_of, session_id_of

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
    assert dict(spy.commands) == {"EVALSHA": 1}
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
    assert dict(spy.commands) == {"EVALSHA": 3}


async def test_read_and_write_is_two_round_trips(client: httpx.AsyncClient, spy: RedisSpy) -> None:
    await _warm(client, spy)
    response = await client.post("/set", json={"b": 2})
    assert spy.round_trips == 2
    # The load; the save, and (pipelined) the bound user's index made to live at
    # least as long as the refreshed session.
    assert dict(spy.commands) == {"EVALSHA": 3}
    assert "set-cookie" not in response.headers  # same id, cookie still valid


async def test_writing_the_same_value_again_is_not_a_write(
    client: httpx.AsyncClient, spy: RedisSpy
) -> None:
    await _warm(client, spy)
    await client.post("/set", json={"warm": 1})
    assert dict(spy.commands) == {"EVALSHA": 1}  # the load; no save
    assert spy.round_trips == 1


async def test_incr_is_two_round_trips(client: httpx.AsyncClient, spy: RedisSpy) -> None:
    await _warm(client, spy)
    response = await client.post("/incr/counter")
    assert response.text == "2"
    assert spy.round_trips == 2
    assert dict(spy.commands) == {"EVALSHA": 2}


async def test_regenerate_of_a_bound_session_is_four_round_trips(
    client: httpx.AsyncClient, spy: RedisSpy
) -> None:
    await _warm(client, spy)
    response = await client.post("/regenerate")
    assert cookie_of(response)
    assert spy.round_trips == 4
    # Load; EVALSHA create new + EVALSHA index add (refused while a revoke of the
    # user runs, and then the old record must stay: so the delete waits for it);
    # EVALSHA delete the old record if still live; SREM it from the user's index
    # (after the delete said it is dead: never un-index a live id).
    assert dict(spy.commands) == {"SREM": 1, "EVALSHA": 4}


async def test_login_as_another_user_is_three_round_trips(
    client: httpx.AsyncClient, spy: RedisSpy
) -> None:
    await _warm(client, spy)
    assert cookie_of(await client.post("/login/other"))
    assert spy.round_trips == 3
    assert dict(spy.commands) == {"SREM": 1, "EVALSHA": 4}


async def test_clear_is_two_round_trips(client: httpx.AsyncClient, spy: RedisSpy) -> None:
    await _warm(client, spy)
    response = await client.post("/logout")
    assert cookie_of(response) == ""
    assert spy.round_trips == 2
    # Load; then delete the record (a script: it names the users whose index may
    # list it) and SREM it from the user's index.
    assert dict(spy.commands) == {"EVALSHA": 2, "SREM": 1}


async def test_idle_refresh_is_throttled(
    real_redis: Redis,
    key_prefix: str,
    spy: RedisSpy,
    peek: Redis,
    make_client: Callable[..., httpx.AsyncClient],
) -> None:
    """The TTL is refreshed at most once per tenth of the idle timeout."""
    idle_ms = 60_000
    client = make_client(build_app(real_redis, key_prefix=key_prefix, idle_timeout=60))
    await _warm(client, spy)
    for _ in range(5):
        await client.get("/read")
    assert "PEXPIRE" not in spy.commands  # fresh TTL: nothing to refresh
    # Age the record by more than a tenth of the idle timeout, as if the session
    # had been idle that long (not by sleeping: a tenth of a short idle timeout is
    # a window a loaded machine can miss, both here and between the reads below).
    key = f"{key_prefix}{session_id_of(client.cookies['session'])}"
    assert await peek.pexpire(key, idle_ms - idle_ms // 10 - 1_000)
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
    # Take the index (leaving a marker), delete, remove the marker and un-index.
    assert spy.round_trips == 3


async def test_one_command_batches_start_no_tasks(redis_url: str, key_prefix: str) -> None:
    """A load, a save, an incr or a TTL refresh is one command sent as it is: no
    redis-py pipeline, whose release of the connection starts a task (and costs
    event-loop turns) on every request. (The client has no socket_timeout: with
    one, redis-py sends every command through asyncio.wait_for, itself a task on
    Python < 3.12.)"""
    client: Redis = Redis.from_url(redis_url, driver_info=None, socket_timeout=None)
    store = SessionStore(client, key_prefix=key_prefix)
    session_id = "s" * 43
    created = str(store.now_ms()).encode()
    ttl = store.ttl_ms(store.now_ms())
    await store.save(session_id, create=True, fields={"m:created": created}, ttl_ms=ttl)
    await store.load(session_id)  # scripts and connection warm
    loop = asyncio.get_running_loop()
    started: list[object] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        record = await store.load(session_id)
        assert record is not None
        assert await store.incr(session_id, "n", 1) == 1
        fields = {"d:a": b"1"}
        assert await store.save(session_id, create=False, fields=fields, ttl_ms=ttl) == 1
        assert await store.touch(session_id, ttl)
    finally:
        loop.set_task_factory(factory)
        await client.delete(store.session_key(session_id))
        await client.aclose()
    assert started == []
