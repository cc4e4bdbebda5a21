"""Fleet counters in Redis: two instances' traffic adds up, an outage during a
flush loses that interval only and never reaches a request, and the flusher
starts and stops cleanly."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from asgi_redis_kit import Cache, FleetFlusher, Metrics, fleet_stats
from asgi_redis_kit.metrics import hit_ratio, lookups
from tests.example_app.helpers import lifespan
from tests.metrics.apps import build, client
from tests.support import DelayProxy, RedisProcess

pytestmark = pytest.mark.real_redis


@pytest.fixture
def fleet_prefix() -> str:
    return f"tm{uuid.uuid4().hex[:10]}:"


async def test_fleet_totals_are_the_sum_of_two_instances(
    redis_url: str, key_prefix: str, fleet_prefix: str
) -> None:
    one, two = Metrics(), Metrics()
    app_one = build(redis=redis_url, key_prefix=key_prefix, metrics=one)
    app_two = build(redis=redis_url, key_prefix=key_prefix, metrics=two)
    async with (
        lifespan(app_one),
        lifespan(app_two),
        FleetFlusher(one, redis_url, instance="one", key_prefix=fleet_prefix, interval=3600) as f1,
        FleetFlusher(two, redis_url, instance="two", key_prefix=fleet_prefix, interval=3600) as f2,
    ):
        async with client(app_one) as http:
            for _ in range(3):
                await http.get("/page")
            await http.get("/write")
        async with client(app_two) as http:
            for _ in range(5):
                await http.get("/page")
            await http.get("/page", headers={"authorization": "x"})
        assert await f1.flush()
        assert await f2.flush()
        expected_one, expected_two = one.snapshot(), two.snapshot()
        fleet = await fleet_stats(redis_url, minutes=2, key_prefix=fleet_prefix)
    assert set(fleet.instances) == {"one", "two"}
    for name, expected in (("one", expected_one), ("two", expected_two)):
        got = {k: v for k, v in fleet.instances[name].totals.items() if k != "_flushes"}
        assert got == expected, name
    for name in {*expected_one, *expected_two}:
        assert fleet.totals[name] == expected_one.get(name, 0) + expected_two.get(name, 0)
    # Seven hits out of nine cache decisions (one miss, then hits: the entry is shared).
    assert fleet.totals["cache_lookups.hit"] == 7
    assert lookups(fleet.totals) == 9
    assert hit_ratio(fleet.totals) == pytest.approx(7 / 9)
    assert fleet.totals["sessions.created"] == 1
    assert fleet.totals["_flushes"] == 2  # one each, by hand


async def test_an_outage_loses_one_interval_and_never_reaches_a_request(
    own_redis: RedisProcess, redis_url: str, key_prefix: str, fleet_prefix: str
) -> None:
    """The fleet's Redis stops answering during a flush (its first command, the
    probe, held back, then dropped with the connection): nothing of that flush
    reached Redis, so its counts go with the next one, and requests never notice."""
    metrics = Metrics()
    app = build(redis=redis_url, key_prefix=key_prefix, metrics=metrics)
    async with DelayProxy(own_redis.port, direction="requests") as proxy:
        flusher = FleetFlusher(
            metrics, proxy.url, instance="a", key_prefix=fleet_prefix, timeout=2, interval=3600
        )
        async with lifespan(app), client(app) as http:
            flusher.start()
            for _ in range(2):
                await http.get("/page")  # a miss, a hit: counted and flushed
            assert await flusher.flush()
            for _ in range(3):
                await http.get("/page")  # three hits, for the flush that fails
            proxy.latency = 30
            sent = proxy.chunks["requests"]
            flushing = asyncio.create_task(flusher.flush())
            await proxy.until_chunks("requests", sent + 1)  # its commands are held back
            # Requests go on while the flush waits on the unanswering Redis.
            for _ in range(2):
                assert (await http.get("/page")).headers["x-cache"] == "HIT"
            assert not flushing.done()
            # Redis goes away with the flush's commands still held back.
            await proxy.stop()
            assert await flushing is False  # nothing raised
            proxy.latency = 0
            await proxy.start()
            assert await flusher.flush()  # the failed flush's hits and the two made meanwhile
            await flusher.stop()
    assert flusher.failures == 1
    fleet = await fleet_stats(own_redis.url, minutes=2, key_prefix=fleet_prefix)
    # 1 miss + 1 hit, then the 3 hits of the failed flush and 2 more, once each.
    assert fleet.totals["cache_lookups.miss"] == 1
    assert fleet.totals["cache_lookups.hit"] == 6
    assert metrics.snapshot()["cache_lookups.hit"] == 6


async def test_the_flusher_runs_on_its_own_and_stops_cleanly(
    redis_url: str, fleet_prefix: str
) -> None:
    metrics = Metrics()
    flusher = FleetFlusher(
        metrics, redis_url, instance="idle", key_prefix=fleet_prefix, interval=0.02
    )
    async with flusher:
        # The flusher has no event to wait on (nobody needs one but this test).
        while flusher.flushes < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    stopped = flusher.flushes
    await asyncio.sleep(0.05)
    assert flusher.flushes == stopped  # the task is gone
    fleet = await fleet_stats(redis_url, minutes=2, key_prefix=fleet_prefix)
    assert fleet.instances["idle"].totals["_flushes"] == stopped
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{{{fleet_prefix}}}:*")]
        assert len(keys) in (1, 2)  # one hash per minute
        ttl = await client.ttl(keys[0])
        assert 0 < ttl <= 61 * 60
        await client.delete(*keys)
    finally:
        await client.aclose()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="braces"):
        FleetFlusher(Metrics(), "redis://localhost", key_prefix="a{b}")
    with pytest.raises(ValueError, match="'\\|'"):
        FleetFlusher(Metrics(), "redis://localhost", instance="a|b")


async def test_one_cache_reset_does_not_resend_the_others_counts(
    redis_url: str, key_prefix: str, fleet_prefix: str
) -> None:
    """Two caches in one process, one of them ``stats.reset()``: the fleet gets
    what happened after, not the other cache's whole count a second time."""
    one = Cache(redis_url, key_prefix=key_prefix + "1:")
    two = Cache(redis_url, key_prefix=key_prefix + "2:")
    metrics = Metrics()
    metrics.watch(one, two)
    flusher = FleetFlusher(metrics, redis_url, instance="a", key_prefix=fleet_prefix, interval=3600)
    try:
        async with flusher:
            for _ in range(5):
                await one.get("absent")
            await two.get("absent")
            assert await flusher.flush()
            two.stats.reset()
            await one.get("absent")
            assert await flusher.flush()
        fleet = await fleet_stats(redis_url, minutes=2, key_prefix=fleet_prefix)
    finally:
        await one.aclose()
        await two.aclose()
    assert fleet.totals["cache_data_lookups.miss"] == 7  # 5 + 1, then 1 more


async def test_redis_down_for_several_flushes_loses_at_most_one_interval(
    own_redis: RedisProcess, redis_url: str, key_prefix: str, fleet_prefix: str
) -> None:
    """Redis refuses connections for two flushes: the counts none of them could
    send reach the fleet with the first flush after it is back."""
    metrics = Metrics()
    app = build(redis=redis_url, key_prefix=key_prefix, metrics=metrics)
    async with DelayProxy(own_redis.port) as proxy:
        flusher = FleetFlusher(
            metrics, proxy.url, instance="a", key_prefix=fleet_prefix, timeout=2, interval=3600
        )
        async with lifespan(app), client(app) as http:
            flusher.start()
            await http.get("/page")
            assert await flusher.flush()
            await proxy.stop()
            for _ in range(2):
                await http.get("/page")
                assert await flusher.flush() is False
            await proxy.start()
            assert await flusher.flush()
            await flusher.stop()
    fleet = await fleet_stats(own_redis.url, minutes=2, key_prefix=fleet_prefix)
    assert fleet.totals["cache_lookups.miss"] == 1
    # One interval may be lost (a round trip under way when Redis went), not both.
    assert fleet.totals["cache_lookups.hit"] >= 1


@pytest.mark.parametrize("minutes", [0, -1, 7 * 24 * 60 + 1, 10**8])
async def test_fleet_stats_refuses_a_window_it_cannot_read_in_bounded_time(
    redis_url: str, minutes: int
) -> None:
    with pytest.raises(ValueError, match="minutes"):
        await fleet_stats(redis_url, minutes=minutes)


async def test_a_flush_that_raises_does_not_end_the_flusher(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A clock of the caller's that raises once costs that flush, logged; the
    task keeps flushing and nothing counted is lost."""
    import time

    raised: list[bool] = []

    def clock() -> float:
        if not raised:
            raised.append(True)
            raise RuntimeError("clock broke")
        return time.time()

    metrics = Metrics()
    prefix = key_prefix + "fleet:"
    async with Cache(redis_url, key_prefix=key_prefix) as cache:
        metrics.watch(cache)
        flusher = FleetFlusher(
            metrics, redis_url, instance="one", key_prefix=prefix, interval=0.05, clock=clock
        )
        async with flusher:
            cache.stats.hits += 3
            for _ in range(200):
                if flusher.flushes:
                    break
                await asyncio.sleep(0.02)
        assert raised
        assert flusher.flushes >= 1
        assert "a flush failed" in caplog.text
        fleet = await fleet_stats(redis_url, key_prefix=prefix, minutes=2)
        assert fleet.totals["cache_lookups.hit"] == 3
