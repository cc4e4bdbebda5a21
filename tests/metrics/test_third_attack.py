"""Third attack on the monitoring: what Prometheus reads must keep the
semantics of a counter; the fleet's settings and flushes. Real Redis; every
test is bounded by the timeout mark."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from asgi_redis_kit import FleetFlusher, Metrics, fleet_stats
from asgi_redis_kit.cache import Cache

pytestmark = [pytest.mark.real_redis, pytest.mark.timeout(60)]


def data_lookups(registry: CollectorRegistry, outcome: str) -> float:
    """The exported asgi_redis_kit_cache_data_lookups_total{outcome=...}, parsed."""
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "asgi_redis_kit_cache_data_lookups_total" and sample.labels == {
                "outcome": outcome
            }:
                return sample.value
    return 0.0


def invalidations(registry: CollectorRegistry) -> list[float]:
    text = generate_latest(registry).decode()
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "asgi_redis_kit_cache_invalidations_total"
    ]


async def test_one_caches_reset_never_makes_the_summed_counter_go_back(
    redis_url: str, key_prefix: str, real_redis: Redis
) -> None:
    # real_redis: removes this test's keys (the tag versions) afterwards.
    # Two caches in one hub are summed into one sample. CacheStats.reset() of
    # one of them took its counts out of the sum: the counter went from 5 to
    # 3, which Prometheus reads as a process restart, so rate()/increase()
    # counted the other cache's whole 3 again as new. (The fleet flusher
    # already diffs per source for this reason.) A counter never goes down
    # while the process lives.
    metrics = Metrics()
    registry = CollectorRegistry()
    registry.register(metrics.collector())
    async with (
        Cache(redis_url, key_prefix=key_prefix + "a:") as a,
        Cache(redis_url, key_prefix=key_prefix + "b:") as b,
    ):
        metrics.watch(a, b)
        for cache, times in ((a, 2), (b, 3)):
            for _ in range(times):
                assert await cache.get("absent") is None
        assert data_lookups(registry, "miss") == 5
        a.stats.reset()
        assert await b.get("absent") is None
        assert data_lookups(registry, "miss") == 6
        await a.invalidate_tags("t")
        await b.invalidate_tags("t")
        assert invalidations(registry) == [2]
        a.stats.reset()  # a labelled counter: the reset one's label is gone from its stats
        assert invalidations(registry) == [2]
        await a.invalidate_tags("t")
        assert invalidations(registry) == [3]


async def test_a_fractional_keep_minutes_is_refused_not_sent_as_a_failing_expire(
    redis_url: str, key_prefix: str, real_redis: Redis
) -> None:
    # keep_minutes=1.5 was accepted: the hash's TTL became 150.0, EXPIRE
    # refuses a float, and every flush then landed its HINCRBYs, failed on the
    # EXPIRE, reported "Redis did not answer", and left the minute's hash
    # with no TTL at all (kept forever). A setting is checked where it is given.
    with pytest.raises(TypeError, match="keep_minutes"):
        FleetFlusher(Metrics(), redis_url, key_prefix=key_prefix, keep_minutes=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="minutes"):
        await fleet_stats(redis_url, key_prefix=key_prefix, minutes=2.5)  # type: ignore[arg-type]
    flusher = FleetFlusher(Metrics(), redis_url, key_prefix=key_prefix, keep_minutes=2)
    try:
        assert await flusher.flush()
        keys = [key async for key in real_redis.scan_iter(match=f"{{{key_prefix}}}:*")]
        assert keys
        assert 0 < await real_redis.ttl(keys[0]) <= 3 * 60
    finally:
        await flusher.stop()
        # The fleet's keys start with the hash tag, not the prefix real_redis cleans.
        async for key in real_redis.scan_iter(match=f"{{{key_prefix}}}:*"):
            await real_redis.delete(key)


async def test_a_flush_cancelled_before_redis_answered_keeps_its_counts(
    redis_url: str, key_prefix: str, real_redis: Redis
) -> None:
    # stop() cancels the flusher's task, which may be in a flush, and then
    # flushes once more. A flush cancelled before its probe was answered sent
    # nothing, yet its counts were taken: the last flush did not send them
    # either, and the shutdown lost them. (A probe that fails keeps them.)
    metrics = Metrics()
    fleet = key_prefix + "fleet"
    async with Cache(redis_url, key_prefix=key_prefix) as cache:
        metrics.watch(cache)
        flusher = FleetFlusher(metrics, redis_url, key_prefix=fleet, instance="web-1")
        try:
            for _ in range(3):
                assert await cache.get("absent") is None
            flush = asyncio.create_task(flusher.flush())
            await asyncio.sleep(0)  # it took its counts and waits on the probe
            flush.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flush
            assert await flusher.flush()
            stats = await fleet_stats(redis_url, key_prefix=fleet)
            assert stats.totals.get("cache_data_lookups.miss") == 3
        finally:
            await flusher.stop()
            async for key in real_redis.scan_iter(match=f"{{{fleet}}}:*"):
                await real_redis.delete(key)
