"""Prometheus exposition: a collector that reads the stats objects at scrape time.

Nothing is recorded through ``prometheus_client`` on the request path: the
counters stay the library's plain ints, and :class:`KitCollector` turns them
into metric families when Prometheus asks (``_catalog`` says which). Sources of
one kind (two caches in one app) are summed, so every sample is unique.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from .._calls import BUCKETS
from ._catalog import COUNTERS
from ._hub import Metrics

PREFIX = "asgi_redis_kit_"
BREAKER_STATES = ("closed", "open", "half-open")
TRACKING_STATES = ("connecting", "tracking", "lost", "closed")


class KitCollector(Collector):
    """Everything a :class:`~asgi_redis_kit.metrics.Metrics` watches, for a
    ``prometheus_client`` registry."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # What collect() yields, so the registry can refuse a clash of names.
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._gauges()
        yield self._latency()

    def _counters(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        for row in COUNTERS:
            labels = [*row.labels, *([row.by] if row.by else [])]
            family = families.get(row.name)
            if family is None:
                family = families[row.name] = CounterMetricFamily(
                    PREFIX + row.name, row.help, labels=labels
                )
            for key, count in self.metrics.values(row):
                values = [*row.labels.values(), *([key] if key is not None else [])]
                family.add_metric(values, count)
        yield from families.values()

    def _gauges(self) -> Iterator[Metric]:
        metrics = self.metrics
        breaker = GaugeMetricFamily(
            PREFIX + "cache_breaker_state",
            "Caches whose circuit breaker is in each state (open: Redis is bypassed)",
            labels=["state"],
        )
        states: list[str] = [cache.breaker.state for cache in metrics.caches]
        for state in BREAKER_STATES:
            breaker.add_metric([state], states.count(state))
        yield breaker
        near = metrics.near_caches
        yield GaugeMetricFamily(
            PREFIX + "near_bytes",
            "Bytes of values held by the near caches",
            value=sum(each.stats.bytes for each in near),
        )
        yield GaugeMetricFamily(
            PREFIX + "near_entries",
            "Entries held by the near caches",
            value=sum(each.stats.entries for each in near),
        )
        tracking = GaugeMetricFamily(
            PREFIX + "near_tracking",
            "Redis nodes whose invalidation channel is in each state (tracking: healthy)",
            labels=["state"],
        )
        # list(): see _hub.values (the loop may add a node during a threaded scrape).
        nodes = [state for each in near for state in list(each.stats.tracking.values())]
        for state in TRACKING_STATES:
            tracking.add_metric([state], nodes.count(state))
        yield tracking

    def _latency(self) -> Metric:
        family = HistogramMetricFamily(
            PREFIX + "redis_call_duration_seconds",
            "Redis round trips through the library, by operation",
            labels=["operation"],
        )
        merged: dict[str, tuple[list[int], float]] = {}
        for backend in self.metrics.backends:
            latency = backend.calls.latency
            if latency is None:
                continue
            for operation, histogram in list(latency.by_operation.items()):  # see _hub.values
                counts, total = merged.get(operation, ([0] * (len(BUCKETS) + 1), 0.0))
                merged[operation] = (
                    [a + b for a, b in zip(counts, histogram.counts, strict=True)],
                    total + histogram.sum,
                )
        for operation, (counts, total) in sorted(merged.items()):
            running, buckets = 0, []
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
                running += count
                buckets.append((bound, float(running)))
            family.add_metric([operation], buckets, total)
        return family


def metrics_app(metrics: Metrics) -> ASGIApp:
    """``prometheus_client``'s ASGI exposition app over a registry holding only
    ``metrics``' collector."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(KitCollector(metrics))
    return _Exposition(make_asgi_app(registry))


class _Exposition:
    """An ASGI app object, not a function, so Starlette's ``Route("/metrics", app)``
    serves it as ASGI (a function would be taken for a request handler)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
