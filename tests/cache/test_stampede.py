"""Behaviour 5: N concurrent misses run the handler once, per process and across processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from asgi_redis_kit import Cache
from asgi_redis_kit.cache._keys import CacheKey, KeyScheme
from asgi_redis_kit.cache._scripts import ACQUIRE, LOOKUP, STORE_AND_RELEASE
from tests.cache.conftest import Calls, Framework, Harness, build, client_for
from tests.support import Arrivals, DelayProxy, RedisSpy


async def _open_gate_once(calls: Calls, arrived: Awaitable[Any]) -> None:
    """Let the first handler call finish once the whole burst is in flight. A
    request that has not joined the leader by then finds its stored entry, so
    only a broken stampede guard runs the handler more than once."""
    assert calls.gate is not None
    await calls.entered.wait()
    await arrived
    calls.gate.set()


async def test_200_concurrent_cold_requests_run_the_handler_once(harness: Harness) -> None:
    harness.calls.gate = asyncio.Event()
    app = Arrivals(harness.app)
    async with client_for(app) as client:
        opener = asyncio.create_task(_open_gate_once(harness.calls, app.reach(200)))
        responses = await asyncio.gather(*(client.get("/page") for _ in range(200)))
        await opener
    assert harness.calls["page"] == 1
    assert {r.text for r in responses} == {"<h1>page 1</h1>"}
    assert sorted({r.headers["x-cache"] for r in responses}) == ["HIT", "MISS"]
    assert sum(r.headers["x-cache"] == "MISS" for r in responses) == 1


async def test_two_processes_sharing_redis_run_the_handler_once(
    framework: Framework, redis_url: str, real_redis: Redis, key_prefix: str
) -> None:
    """Two app instances with their own Cache and their own Redis client (what
    two uvicorn workers are) on one real Redis: the lease makes one of them
    wait for the other's entry."""
    calls = Calls(gate=asyncio.Event())
    # A generous deadline: with the default 0.5 s, the first lookup of each (a new
    # connection, behind 200 requests on one event loop) can miss it on a loaded
    # machine, and every request then fails open and runs the handler.
    caches = [Cache(redis_url, key_prefix=key_prefix, timeout=5) for _ in range(2)]
    apps = [Arrivals(build(framework, cache, calls)) for cache in caches]
    clients = [client_for(app) for app in apps]
    try:
        arrived = asyncio.gather(*(app.reach(100) for app in apps))
        opener = asyncio.create_task(_open_gate_once(calls, arrived))
        responses = await asyncio.gather(*(clients[n % 2].get("/page") for n in range(200)))
        await opener
        assert calls["page"] == 1
        assert {r.status_code for r in responses} == {200}
        assert {r.text for r in responses} == {"<h1>page 1</h1>"}
    finally:
        # Also when an assertion failed: unclosed pools are garbage collected
        # during a later test, whose unraisable ResourceWarnings then fail it.
        for client, cache in zip(clients, caches, strict=True):
            await client.aclose()
            await cache.aclose()


async def test_waiters_never_get_a_per_user_response(harness: Harness) -> None:
    """The leader's answer read the session (not storable): waiters re-read the
    cache, find nothing, and each runs the handler for its own user."""
    harness.calls.gate = asyncio.Event()
    app = Arrivals(harness.app)
    users = [f"user{n}" for n in range(20)]
    async with client_for(app) as client:
        opener = asyncio.create_task(_open_gate_once(harness.calls, app.reach(len(users))))
        responses = await asyncio.gather(
            *(client.get("/whoami", headers={"cookie": f"session={u}"}) for u in users)
        )
        await opener
    for user, response in zip(users, responses, strict=True):
        assert response.text.startswith(f"user {user} call")
        # Their session cookies bypass the shared route before any lookup.
        assert (response.headers["x-cache"], response.headers["x-cache-reason"]) == (
            "BYPASS",
            "session",
        )


async def test_a_stuck_lease_delays_but_never_blocks(
    framework: Framework, real_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix, lock_wait=0.3)
    calls = Calls()
    async with client_for(build(framework, cache, calls)) as client:
        await client.get("/page")
        (entry_key,) = [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:e:*")]
        await real_redis.delete(entry_key)
        # A leader in another process that died holding the lease.
        await real_redis.set(entry_key.replace(b":e:", b":l:"), b"dead-token", px=60_000)
        started = time.monotonic()
        response = await client.get("/page")
        assert response.status_code == 200
        assert response.headers["x-cache"] == "MISS"
        assert time.monotonic() - started < 10  # generous "did not hang" bound
    assert calls["page"] == 2
    await cache.aclose()


async def test_release_only_deletes_our_own_lease(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix)
    key = _key(key_prefix, "/x")
    token, _ = await cache.acquire(key, (0, 0))
    assert token is not None
    assert await cache.acquire(key, (0, 0)) == (None, None)  # held
    # Our lease expired and another process took it: releasing must not free theirs.
    await real_redis.set(key.lock, b"theirs")
    await cache.release(key, token)
    assert await real_redis.get(key.lock) == b"theirs"
    await real_redis.set(key.lock, token.encode())
    await cache.release(key, token)
    assert await real_redis.get(key.lock) is None
    await cache.aclose()


async def test_lease_has_an_expiry(real_redis: Redis, key_prefix: str) -> None:
    cache = Cache(real_redis, key_prefix=key_prefix, lock_lease=5)
    key = _key(key_prefix, "/y")
    token, _ = await cache.acquire(key, (0, 0))
    assert token is not None
    assert 0 < await real_redis.pttl(key.lock) <= 5000
    await cache.aclose()


def _key(key_prefix: str, path: str) -> CacheKey:
    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    return KeyScheme(key_prefix).for_request(
        scope,
        namespace="default",
        host="h",
        vary=(),
        session_cookie_name="session",
        vary_on_session=False,
        tags=(),
        custom=None,
    )


async def test_a_cold_miss_takes_the_lease_in_its_lookup(
    harness: Harness, real_redis: Redis, key_prefix: str, spy: RedisSpy
) -> None:
    """Lookup and lease are one round trip; the store releases it: 2 in all. The
    lease is really held (with an expiry) while the handler runs."""
    await harness.client.get("/items/0")  # load the Lua scripts once (EVALSHA fallback)
    harness.calls.gate = asyncio.Event()
    spy.reset()
    pending = asyncio.create_task(harness.client.get("/page"))
    await harness.calls.entered.wait()
    assert (spy.round_trips, dict(spy.commands)) == (1, {"EVALSHA": 1})
    leases = [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:l:*")]
    assert len(leases) == 1
    assert 0 < await real_redis.pttl(leases[0]) <= 10_000
    spy.reset()
    harness.calls.gate.set()
    miss = await pending
    assert miss.headers["x-cache"] == "MISS"
    assert (spy.round_trips, dict(spy.commands)) == (1, {"EVALSHA": 1})  # store + release
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:l:*")] == []
    spy.reset()
    assert (await harness.client.get("/page")).headers["x-cache"] == "HIT"
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:l:*")] == []


async def test_an_invalidated_entry_still_takes_the_lease_before_running(
    harness: Harness, real_redis: Redis, key_prefix: str, spy: RedisSpy
) -> None:
    """An entry key that exists under old versions is a miss the lookup cannot
    lease (the script does not decode entries, and this process knows the key is
    there, so it sent a plain MGET): the leader takes the lease itself, then
    stores: 3 round trips."""
    await harness.client.get("/items/5")
    await harness.cache.invalidate_tags("item:5")
    spy.reset()
    miss = await harness.client.get("/items/5")
    assert miss.headers["x-cache"] == "MISS"
    assert (spy.round_trips, dict(spy.commands)) == (3, {"MGET": 1, "EVALSHA": 2})
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:l:*")] == []
    assert (await harness.client.get("/items/5")).headers["x-cache"] == "HIT"
    assert harness.calls["item"] == 2


async def test_lookups_sharing_a_lease_hand_it_to_exactly_one_request(
    any_redis: Redis, key_prefix: str
) -> None:
    cache = Cache(any_redis, key_prefix=key_prefix)
    key = _key(key_prefix, "/shared")
    found = await asyncio.gather(*(cache.lookup(key, lease=True) for _ in range(10)))
    tokens = [f.token for f in found if f.token is not None]
    assert len(tokens) == 1
    assert not any(f.locked for f in found)
    assert await any_redis.get(key.lock) == tokens[0].encode()
    # Another lookup now finds the lease held by someone else.
    again = await cache.lookup(key, lease=True)
    assert (again.token, again.locked) == (None, True)
    await cache.release(key, tokens[0])
    # A lookup without lease never takes one.
    plain = await cache.lookup(key)
    assert (plain.token, plain.locked) == (None, False)
    assert await any_redis.get(key.lock) is None
    await cache.aclose()


async def test_a_lease_whose_requests_were_all_cancelled_is_released(
    framework: Framework, redis_url: str, real_redis: Redis, key_prefix: str
) -> None:
    """The request that sent the lookup is cancelled after its script took the
    lease, while Redis' reply is still on its way (a DelayProxy holds it back):
    nobody will store with that token, so it is released, and the request that
    waited on that lookup looks up for itself and fills the page."""
    calls = Calls()
    async with DelayProxy(urlsplit(redis_url).port or 6379) as proxy:
        # No deadline in the way (only the cancel ends the wait below); a lease
        # left behind would cost the other request lock_wait, then show in Redis.
        cache = Cache(proxy.url, key_prefix=key_prefix, timeout=30, lock_wait=2)
        try:
            async with client_for(build(framework, cache, calls)) as client:
                # Connect and load the scripts while nothing is held back.
                assert (await client.get("/items/0")).headers["x-cache"] == "MISS"
                proxy.latency = 30
                sent, replied = proxy.chunks["requests"], proxy.chunks["replies"]
                first = asyncio.create_task(client.get("/page"))
                joiner = asyncio.create_task(client.get("/page"))
                await proxy.until_chunks("replies", replied + 1)
                # One lookup for both requests; it ran in Redis and took the lease.
                assert proxy.chunks["requests"] == sent + 1
                assert len(await _leases(real_redis, key_prefix)) == 1
                proxy.latency = 0
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                assert first.cancelled()
                response = await joiner  # neither cancelled nor failed with it
                await cache.wait_background()
                assert (response.status_code, response.headers["x-cache"]) == (200, "MISS")
                assert calls["page"] == 1
                assert await _leases(real_redis, key_prefix) == []
                assert (await client.get("/page")).headers["x-cache"] == "HIT"
        finally:
            await cache.aclose()


async def _leases(redis: Redis, key_prefix: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{key_prefix}*:l:*")]


async def test_hits_use_mget_and_a_vanished_or_expired_entry_is_still_a_leased_miss(
    harness: Harness, real_redis: Redis, key_prefix: str, spy: RedisSpy
) -> None:
    """The process remembers which entries are in Redis until when: those are
    looked up with MGET (Redis runs it ~10x faster than a script). The memory is
    only a hint: an entry evicted early is a miss that takes its lease with a
    round trip of its own; once its lifetime is over, the lookup takes the
    lease again."""
    for script in (LOOKUP, ACQUIRE, STORE_AND_RELEASE):
        await real_redis.script_load(script)  # so EVALSHA never falls back here
    assert (await harness.client.get("/page")).headers["x-cache"] == "MISS"
    entries = [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:e:*")]
    spy.reset()
    assert (await harness.client.get("/page")).headers["x-cache"] == "HIT"
    assert (spy.round_trips, dict(spy.commands)) == (1, {"MGET": 1})

    await real_redis.delete(*entries)  # evicted behind our back
    spy.reset()
    assert (await harness.client.get("/page")).headers["x-cache"] == "MISS"
    assert (spy.round_trips, dict(spy.commands)) == (3, {"MGET": 1, "EVALSHA": 2})
    assert harness.calls["page"] == 2

    harness.clock.advance(61)  # past the entry's 60 s: gone as far as we know
    await real_redis.delete(*[k async for k in real_redis.scan_iter(match=f"{key_prefix}*:e:*")])
    spy.reset()
    assert (await harness.client.get("/page")).headers["x-cache"] == "MISS"
    assert (spy.round_trips, dict(spy.commands)) == (2, {"EVALSHA": 2})
    assert [k async for k in real_redis.scan_iter(match=f"{key_prefix}*:l:*")] == []
    assert harness.calls["page"] == 3
