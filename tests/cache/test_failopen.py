"""Behaviour 8: Redis down means uncached, never broken; the breaker closes by itself.

Checklist 31 (down at startup), 33 (paused: bounded by the deadline), 38
(lifespan shutdown closes what we own)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from asgi_redis_kit import Cache, CacheMiddleware, cached
from asgi_redis_kit.cache._breaker import CircuitBreaker
from asgi_redis_kit.cache._lock import Flight, SingleFlight
from tests.cache.conftest import Calls, Clock, Framework, build, client_for, starlette_app
from tests.support import RedisProcess, Tally

pytestmark = pytest.mark.real_redis


async def test_redis_stopped_then_restarted(framework: Framework, own_redis: RedisProcess) -> None:
    # A stopped Redis refuses at once, so a long deadline costs nothing. The
    # cache's clock also times the breaker's cool-down: the ten calls below all
    # fall inside it however slow the machine, and it ends without a real wait.
    clock = Clock()
    cache = Cache(own_redis.url, timeout=2, breaker_threshold=3, breaker_cooldown=5, clock=clock)
    calls = Calls()
    async with client_for(build(framework, cache, calls)) as client:
        assert (await client.get("/page")).headers["x-cache"] == "MISS"
        own_redis.stop()
        for n in range(10):
            response = await client.get("/page")
            assert response.status_code == 200, n
            assert response.text == f"<h1>page {n + 2}</h1>"
            assert (response.headers["x-cache"], response.headers["x-cache-reason"]) == (
                "BYPASS",
                "backend",
            )
        # Three failures opened the breaker; the other seven never touched Redis.
        assert cache.stats.errors == 3
        assert cache.breaker.state == "open"
        own_redis.start()
        assert state_of(cache.breaker) == "open"  # Redis is back, but the cool-down runs
        clock.advance(5)  # the cool-down; then one probe is let through
        probe = await client.get("/page?after=1")
        assert probe.headers["x-cache"] == "MISS"
        assert state_of(cache.breaker) == "closed"
        assert (await client.get("/page?after=1")).headers["x-cache"] == "HIT"
    assert cache.stats.errors == 3
    await cache.aclose()


async def test_redis_down_at_startup_serves_uncached(framework: Framework) -> None:
    dead = RedisProcess()  # a port nobody listens on
    cache = Cache(dead.url, timeout=0.2)
    calls = Calls()
    async with client_for(build(framework, cache, calls)) as client:
        started = time.monotonic()
        responses = [await client.get("/page") for _ in range(3)]
        assert time.monotonic() - started < 10  # generous "did not hang" bound
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert calls["page"] == 3
    await cache.aclose()
    dead.close()


async def test_paused_redis_costs_one_deadline_not_a_hang(
    framework: Framework, own_redis: RedisProcess
) -> None:
    cache = Cache(own_redis.url, timeout=0.2, breaker_threshold=1, breaker_cooldown=60)
    calls = Calls()
    async with client_for(build(framework, cache, calls)) as client:
        await client.get("/page")
        own_redis.pause()
        try:
            started = time.monotonic()
            responses = await asyncio.gather(*(client.get(f"/page?n={n}") for n in range(20)))
            assert time.monotonic() - started < 10
        finally:
            own_redis.resume()
    assert {r.status_code for r in responses} == {200}
    assert {r.headers["x-cache"] for r in responses} == {"BYPASS"}
    await cache.aclose()


class Followers(SingleFlight):
    """The cache's single-flight, counting the requests that found a leader to wait
    on: each waits right after asking, so once ``tally`` reaches a burst's size
    less one, the burst is waiting and the leader may finish. (A request that came
    after the leader's run ended would lead a run of its own.) It only counts,
    changing nothing: nothing outside the cache shows that a request waits."""

    def __init__(self) -> None:
        super().__init__()
        self.tally = Tally()

    def waiting_on(self, key: str) -> Flight | None:
        flight = super().waiting_on(key)
        if flight is not None:
            self.tally.add()
        return flight


async def _open_gate_once_followed(calls: Calls, followers: Followers, count: int) -> None:
    assert calls.gate is not None
    try:
        async with asyncio.timeout(20):  # the assertions then say what went wrong
            await calls.entered.wait()
            await followers.tally.reach(count)
    finally:
        calls.gate.set()


@pytest.mark.parametrize("fault", ["stopped", "paused"])
async def test_a_burst_while_redis_fails_runs_the_handler_once(
    framework: Framework, own_redis: RedisProcess, fault: str
) -> None:
    """Redis refusing connections, or too slow to answer within the deadline: the
    cache can neither serve nor store, but 50 concurrent requests for one page
    still make one handler run, whose response the other 49 get."""
    cache = Cache(own_redis.url, timeout=0.2)
    cache.flights = followers = Followers()
    calls = Calls(gate=asyncio.Event())
    async with client_for(build(framework, cache, calls)) as client:
        if fault == "stopped":
            own_redis.stop()
        else:
            own_redis.pause()
        try:
            opener = asyncio.create_task(_open_gate_once_followed(calls, followers, 49))
            responses = await asyncio.gather(*(client.get("/page") for _ in range(50)))
            await opener
        finally:
            if fault == "paused":
                own_redis.resume()
    assert calls["page"] == 1
    assert {(r.status_code, r.text) for r in responses} == {(200, "<h1>page 1</h1>")}
    labels = Counter((r.headers["x-cache"], r.headers["x-cache-reason"]) for r in responses)
    assert labels == {("BYPASS", "backend"): 1, ("HIT", "coalesced"): 49}
    assert cache.stats.coalesced == 49
    await cache.aclose()


async def test_a_response_the_rules_refuse_is_not_shared_while_redis_fails(
    framework: Framework, own_redis: RedisProcess
) -> None:
    """/whoami reads the session: two users at once each get their own. Their
    session cookies bypass the shared route before any lookup (checklist 22),
    so neither waits on the other's run nor asks the failed Redis."""
    cache = Cache(own_redis.url, timeout=0.2)
    cache.flights = Followers()
    calls = Calls()
    async with client_for(build(framework, cache, calls)) as client:
        own_redis.stop()
        ada, bob = await asyncio.gather(
            client.get("/whoami", headers={"cookie": "session=ada"}),
            client.get("/whoami", headers={"cookie": "session=bob"}),
        )
    assert (ada.status_code, bob.status_code) == (200, 200)
    assert ada.text.startswith("user ada call ")
    assert bob.text.startswith("user bob call ")
    assert calls["whoami"] == 2
    assert cache.stats.coalesced == 0
    for response in (ada, bob):
        assert (response.headers["x-cache"], response.headers["x-cache-reason"]) == (
            "BYPASS",
            "session",
        )
    assert cache.stats.bypass["session"] == 2
    assert cache.stats.bypass["backend"] == 0  # Redis was never asked
    assert cache.stats.misses == 0
    await cache.aclose()


async def test_waiters_get_the_response_without_waiting_for_its_background_task(
    own_redis: RedisProcess,
) -> None:
    """The leader's app returns only after its BackgroundTask; its waiters are
    answered as soon as its response exists (here the task waits for them)."""
    runs: list[int] = []
    answered = asyncio.Event()
    started = asyncio.Event()
    followers = Followers()

    async def after_response() -> None:
        await answered.wait()

    @cached(ttl=60)
    async def page(request: Request) -> Response:
        runs.append(1)
        started.set()
        await followers.tally.reach(5)
        return PlainTextResponse("page", background=BackgroundTask(after_response))

    # Waiters would otherwise wait for the leader's end up to lock_wait: far beyond
    # the did-not-hang bound below.
    cache = Cache(own_redis.url, timeout=0.2, lock_wait=120)
    cache.flights = followers
    app = Starlette(
        routes=[Route("/page", page)], middleware=[Middleware(CacheMiddleware, cache=cache)]
    )
    own_redis.stop()
    async with client_for(app) as client:
        leader = asyncio.create_task(client.get("/page"))
        await started.wait()
        async with asyncio.timeout(30):  # did not hang
            waiters = await asyncio.gather(*(client.get("/page") for _ in range(5)))
        answered.set()
        assert (await leader).text == "page"
    assert [w.text for w in waiters] == ["page"] * 5
    assert {w.headers["x-cache-reason"] for w in waiters} == {"coalesced"}
    assert runs == [1]
    await cache.aclose()


def state_of(breaker: CircuitBreaker) -> str:
    """The state as a plain str (mypy narrows a property across calls otherwise)."""
    return breaker.state


def test_breaker_states() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown=5, clock=lambda: now[0])
    assert breaker.allow()
    breaker.failure()
    assert state_of(breaker) == "closed"
    breaker.failure()
    assert (breaker.state, breaker.allow()) == ("open", False)
    now[0] = 5
    assert breaker.allow()  # the one half-open probe
    assert not breaker.allow()  # nobody else while it runs
    breaker.failure()
    assert state_of(breaker) == "open"
    now[0] = 10
    assert breaker.allow()
    breaker.abandon()  # a cancelled probe lets the next one try
    assert breaker.allow()
    breaker.success()
    assert (breaker.state, breaker.allow()) == ("closed", True)
    with pytest.raises(ValueError, match="breaker_threshold"):
        CircuitBreaker(threshold=0)


def test_a_clock_stepped_back_ends_the_cool_down_instead_of_stretching_it() -> None:
    """The cache times its breaker with its wall clock (``Cache(clock=...)``), which
    NTP may step back: an open breaker then lets one probe through at once (the
    worst case is one early probe), rather than bypassing the cache until the
    clock has caught up with the time it opened at."""
    now = [1_000.0]
    breaker = CircuitBreaker(threshold=1, cooldown=5, clock=lambda: now[0])
    breaker.failure()
    assert (breaker.state, breaker.allow()) == ("open", False)
    now[0] -= 3600  # stepped back an hour
    assert breaker.allow()  # the probe
    assert not breaker.allow()
    breaker.failure()  # it failed: a new cool-down from the stepped-back time
    now[0] += 4
    assert (breaker.state, breaker.allow()) == ("open", False)
    now[0] += 1
    assert breaker.allow()


async def test_lifespan_shutdown_closes_an_owned_client(redis_url: str) -> None:
    calls = Calls()
    app = CacheMiddleware(starlette_app(calls, []), redis=redis_url)
    await app.cache.backend.client.ping()
    closed: list[bool] = []
    original = app.cache.backend.aclose

    async def recording_close() -> None:
        closed.append(True)
        await original()

    app.cache.backend.aclose = recording_close  # type: ignore[method-assign]
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await app(scope, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert closed == [True]


async def test_ten_times_the_pool_size_degrades_without_errors(
    framework: Framework, redis_url: str, real_redis: Redis, key_prefix: str
) -> None:
    """Checklist 35: 40 concurrent requests for distinct keys on a pool of 4."""
    cache = Cache(redis_url, key_prefix=key_prefix, max_connections=4, timeout=2)
    calls = Calls()
    async with client_for(build(framework, cache, calls)) as client:
        started = time.monotonic()
        responses = await asyncio.gather(*(client.get(f"/items/{n}") for n in range(40)))
        assert time.monotonic() - started < 20  # generous "did not hang" bound
        assert {r.status_code for r in responses} == {200}
        again = await asyncio.gather(*(client.get(f"/items/{n}") for n in range(40)))
        assert {r.headers["x-cache"] for r in again} == {"HIT"}
    assert cache.breaker.allow()
    await cache.aclose()
