"""The counters move as documented, one outcome at a time, on a real Redis, and
/metrics shows them in a form prometheus_client's own parser reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.applications import Starlette

from asgi_redis_kit import Metrics, NearCache, SessionStore
from asgi_redis_kit.cache import Cache
from tests.example_app.helpers import lifespan
from tests.metrics.apps import build, client
from tests.near.cache_app import near_ready
from tests.support import RedisProcess

pytestmark = pytest.mark.real_redis

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def app(redis_url: str, key_prefix: str) -> AsyncIterator[tuple[Starlette, Metrics]]:
    metrics = Metrics()
    app = build(redis=redis_url, key_prefix=key_prefix, metrics=metrics)
    async with lifespan(app):  # builds the middleware stack: they watch what they make
        yield app, metrics


async def scrape(app: Starlette) -> Samples:
    """Every sample of /metrics by (name, sorted labels), parsed by prometheus_client."""
    async with client(app) as http:
        response = await http.get("/metrics/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith("asgi_redis_kit_")
        for sample in family.samples:
            assert isinstance(sample, Sample)
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_cache_outcomes(app: tuple[Starlette, Metrics]) -> None:
    asgi, metrics = app
    (cache,) = metrics.caches
    async with client(asgi) as http:
        first = await http.get("/page")
        assert first.headers["x-cache"] == "MISS"
        assert cache.stats.misses == 1
        assert cache.stats.stores == 1
        second = await http.get("/page")
        assert second.headers["x-cache"] == "HIT"
        assert cache.stats.hits == 1
        etag = second.headers["etag"]
        assert (await http.get("/page", headers={"if-none-match": etag})).status_code == 304
        assert cache.stats.hits == 2
        assert cache.stats.not_modified == 1
        assert (await http.post("/page")).status_code in (200, 405)
        assert (await http.get("/page", headers={"authorization": "Bearer x"})).status_code == 200
        await http.get("/private")
    assert cache.stats.bypass == {"authorization": 1} or cache.stats.bypass["authorization"] == 1
    assert cache.stats.not_stored["cache-control"] == 1
    samples = await scrape(asgi)
    lookups = "asgi_redis_kit_cache_lookups_total"
    assert value(samples, lookups, outcome="hit") == 2
    assert value(samples, lookups, outcome="miss") == cache.stats.misses == 2
    assert value(samples, lookups, outcome="stale") == 0
    assert value(samples, "asgi_redis_kit_cache_not_modified_total") == 1
    assert value(samples, "asgi_redis_kit_cache_stores_total") == 1
    assert value(samples, "asgi_redis_kit_cache_bypasses_total", reason="authorization") == 1
    assert value(samples, "asgi_redis_kit_cache_not_stored_total", reason="cache-control") == 1
    assert value(samples, "asgi_redis_kit_cache_breaker_state", state="closed") == 1
    assert value(samples, "asgi_redis_kit_cache_breaker_state", state="open") == 0
    # Every cache round trip was timed: lookups, the store, the second lookup...
    calls = value(
        samples, "asgi_redis_kit_redis_call_duration_seconds_count", operation="cache_lookup"
    )
    assert calls >= 3
    assert (
        value(samples, "asgi_redis_kit_redis_call_duration_seconds_count", operation="cache_store")
        == cache.stats.stores
    )
    assert (
        value(
            samples,
            "asgi_redis_kit_redis_call_duration_seconds_bucket",
            operation="cache_lookup",
            le="+Inf",
        )
        == calls
    )


async def test_session_events(
    app: tuple[Starlette, Metrics], redis_url: str, key_prefix: str
) -> None:
    asgi, metrics = app
    (store,) = metrics.stores
    stats = store.stats
    async with client(asgi) as http:
        await http.get("/write")
        assert stats.created == 1
        assert stats.loaded == 0
        assert (await http.get("/read")).text == "1"
        assert stats.loaded == 1
        assert stats.saved == 0
        await http.get("/write", params={"n": 2})
        assert stats.saved == 1
        old = http.cookies["session"]
        await http.get("/login", params={"user": "ann"})
        assert stats.regenerated == 1
        # The old cookie's session is gone: a validly signed id with no record.
        async with client(asgi) as replay:
            replay.cookies["session"] = old
            assert (await replay.get("/read")).text == "None"
        assert stats.not_found == 1
        await http.get("/logout")
        assert stats.cleared == 1
        await http.get("/login", params={"user": "bob"})
    async with SessionStore(redis_url, key_prefix=key_prefix + "s:") as admin:
        assert await admin.revoke_user("bob") == 1
        assert admin.stats.revoked == 1  # the admin's store counts its own revokes
    await store.revoke_user("bob")  # nothing left to revoke
    assert stats.revoked == 0
    samples = await scrape(asgi)
    for event, count in [("loaded", 4), ("created", 2), ("saved", 1), ("regenerated", 1)]:
        assert value(samples, "asgi_redis_kit_sessions_total", event=event) == count, event
    assert value(samples, "asgi_redis_kit_sessions_total", event="cleared") == 1
    assert value(samples, "asgi_redis_kit_sessions_total", event="not_found") == 1
    ops = {labels for name, labels in samples if name.endswith("duration_seconds_count")}
    assert (("operation", "session_load"),) in ops
    assert (("operation", "session_save"),) in ops


async def test_redis_outage_counts_503_and_timeouts(
    own_redis: RedisProcess, redis_url: str, key_prefix: str
) -> None:
    metrics = Metrics()
    asgi = build(
        redis=redis_url, session_redis=own_redis.url, key_prefix=key_prefix, metrics=metrics
    )
    async with lifespan(asgi), client(asgi) as http:
        await http.get("/write")
        (store,) = metrics.stores
        own_redis.pause()
        try:
            assert (await http.get("/read")).status_code == 503
            assert (await http.get("/write")).status_code == 503
        finally:
            own_redis.resume()
        assert store.stats.unavailable == 2
        assert store.backend.calls.timeouts["session_load"] >= 1
        samples = await scrape(asgi)
    assert value(samples, "asgi_redis_kit_session_unavailable_total") == 2
    assert value(samples, "asgi_redis_kit_redis_call_timeouts_total", operation="session_load") >= 1


async def test_invalidations(app: tuple[Starlette, Metrics]) -> None:
    asgi, metrics = app
    async with client(asgi) as http:
        await http.get("/invalidate")
    assert metrics.caches[0].stats.invalidations["tag"] == 2


async def test_two_caches_are_summed(redis_url: str, key_prefix: str) -> None:
    """Two caches in one hub: one sample per label set, their sum (Prometheus
    refuses duplicates)."""
    metrics = Metrics()
    async with (
        Cache(redis_url, key_prefix=key_prefix + "a:") as a,
        Cache(redis_url, key_prefix=key_prefix + "b:") as b,
    ):
        metrics.watch(a, b, a)
        a.stats.hits, b.stats.hits = 2, 3
        a.stats.bypass["method"] = 1
        b.stats.bypass["method"] = 4
        assert metrics.snapshot()["cache_lookups.hit"] == 5
        assert metrics.snapshot()["cache_bypasses.method"] == 5
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(metrics.collector())
        text = generate_latest(registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    hits = [
        s
        for s in families["asgi_redis_kit_cache_lookups"].samples
        if s.labels == {"outcome": "hit"}
    ]
    assert [s.value for s in hits] == [5]
    assert metrics.caches == [a, b]


async def test_near_cache_metrics(redis_url: str, key_prefix: str) -> None:
    """With a near cache: its hits, what it holds and its tracking state."""
    metrics = Metrics()
    near = NearCache()
    asgi = build(redis=redis_url, key_prefix=key_prefix, metrics=metrics, near_cache=near)
    try:
        async with lifespan(asgi), client(asgi) as http:
            (cache,) = metrics.caches
            await near_ready(cache)
            for _ in range(50):  # until a hit is answered from memory (see tests/near)
                await http.get("/page")
                if cache.stats.near_hits:
                    break
                await asyncio.sleep(0.01)
            samples = await scrape(asgi)
    finally:
        await near.aclose()
    assert near.stats.hits >= 1
    assert value(samples, "asgi_redis_kit_cache_near_lookups_total", outcome="hit") >= 1
    assert value(samples, "asgi_redis_kit_near_hits_total") == near.stats.hits
    assert value(samples, "asgi_redis_kit_near_stores_total") >= 1
    assert value(samples, "asgi_redis_kit_near_bytes") > 0
    assert value(samples, "asgi_redis_kit_near_entries") >= 1
    assert value(samples, "asgi_redis_kit_near_tracking", state="tracking") == 1


async def test_data_cache_counters(redis_url: str, key_prefix: str) -> None:
    """The data cache's counters reach Prometheus through their catalog rows."""
    metrics = Metrics()
    async with Cache(redis_url, key_prefix=key_prefix) as cache:
        metrics.watch(cache)
        await cache.set("clave", "valor", ttl=60)
        assert await cache.get("clave") == "valor"
        assert await cache.get("missing") is None
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(metrics.collector())
        text = generate_latest(registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    lookups = "asgi_redis_kit_cache_data_lookups_total"
    assert value(samples, lookups, outcome="hit") == 1
    assert value(samples, lookups, outcome="miss") == 1
    assert value(samples, "asgi_redis_kit_cache_data_stores_total") == 1
    assert metrics.snapshot()["cache_data_lookups.hit"] == 1
