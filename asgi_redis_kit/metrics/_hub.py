"""Metrics: the stats objects an app's metrics are read from, gathered in one place.

The library's counters are plain ints on ``CacheStats``, ``SessionStats``,
``NearStats`` and each Redis backend's ``CallStats``, incremented in place where
things happen. A :class:`Metrics` only knows where they are: the Prometheus
collector reads them at scrape time and the fleet flusher diffs snapshots of
them, so a request pays nothing for either. Watching a backend also switches
on its latency histogram (two clock reads per Redis call).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .._calls import Latency
from ._catalog import COUNTERS, Row, Source

if TYPE_CHECKING:
    from prometheus_client.registry import Collector
    from starlette.types import ASGIApp

    from .._redis import Backend
    from ..cache import Cache
    from ..near import NearCache
    from ..sessions import SessionStore


class Metrics:
    """What to export: the caches, session stores, near caches and Redis backends
    of one process. Pass it as ``metrics=`` to ``CacheMiddleware`` and
    ``SessionMiddleware`` (they watch what they create), or :meth:`watch` a
    ``Cache`` or ``SessionStore`` of your own::

        metrics = Metrics()
        app = Starlette(routes=[Mount("/metrics", metrics.asgi_app())], middleware=[
            Middleware(CacheMiddleware, redis=url, metrics=metrics),
            Middleware(SessionMiddleware, secret_key=key, redis=url, metrics=metrics),
        ])

    Parameters:
        latency: time every Redis call of the watched backends into a histogram
            by operation (``asgi_redis_kit_redis_call_duration_seconds``).
    """

    def __init__(self, *, latency: bool = True) -> None:
        self.caches: list[Cache] = []
        self.stores: list[SessionStore] = []
        self.backends: list[Backend] = []
        self._near: dict[int, NearCache] = {}
        self._latency = latency
        # For values(): per (stats object, attribute), per label value, the last
        # count read and what resets of that object have taken away since.
        self._seen: dict[tuple[int, str], dict[str | None, tuple[int, int]]] = {}

    def __repr__(self) -> str:
        return (
            f"<Metrics caches={len(self.caches)} stores={len(self.stores)} "
            f"backends={len(self.backends)}>"
        )

    # -- what to read ---------------------------------------------------------------

    def watch(self, *targets: Cache | SessionStore) -> None:
        """Export the counters of ``targets`` (and of their near caches and Redis
        backends). Watching one twice is harmless."""
        from ..cache import Cache

        for target in targets:
            if isinstance(target, Cache):
                if target not in self.caches:
                    self.caches.append(target)
                    self._watch_backend(target.backend, "cache")
                    self._watch_near(target.near_cache)
            else:
                if target not in self.stores:
                    self.stores.append(target)
                    self._watch_backend(target.backend, "session")
                    self._watch_near(target.near)

    def _watch_backend(self, backend: Backend, label: str) -> None:
        if any(backend is known for known in self.backends):
            return
        self.backends.append(backend)
        if backend.label == "redis":  # the default: name the calls after their owner
            backend.label = label
        if self._latency and backend.calls.latency is None:
            backend.calls.latency = Latency()

    def _watch_near(self, near: NearCache | None) -> None:
        if near is not None:
            self._near[id(near)] = near

    @property
    def near_caches(self) -> list[NearCache]:
        return list(self._near.values())

    def sources(self, source: Source) -> Iterator[Any]:
        """The stats objects a catalog row of ``source`` reads."""
        if source == "cache":
            yield from (cache.stats for cache in self.caches)
        elif source == "session":
            yield from (store.stats for store in self.stores)
        elif source == "near":
            yield from (near.stats for near in self._near.values())
        else:
            yield from (backend.calls for backend in self.backends)

    def values(self, row: Row) -> Iterator[tuple[str | None, int]]:
        """(``by`` label value or None, count) of one row, summed over its sources.

        Never lower than the last time it was read: a source whose stats were
        reset since (``stats.reset()``) counts on from what it had reached. A
        sum that went down would be read by Prometheus as a restart, and
        ``rate()`` would count the other sources' whole totals again."""
        summed: dict[str | None, int] = {} if row.by is not None else {None: 0}
        for stats in self.sources(row.source):
            value = getattr(stats, row.attr)
            # dict() copies the map in one step: a scrape may run in another
            # thread (prometheus_client's own server) while the loop adds a key.
            now: dict[str | None, int] = dict(value) if row.by is not None else {None: value}
            # (last count read, what resets took away) per label value: a reset
            # Counter loses its keys, so the ones read before are read again.
            seen = self._seen.setdefault((id(stats), row.attr), {})
            for key in now.keys() | seen.keys():
                count = now.get(key, 0)
                last, carried = seen.get(key, (0, 0))
                if count < last:
                    carried += last
                seen[key] = (count, carried)
                summed[key] = summed.get(key, 0) + carried + count
        yield from summed.items()

    def snapshot(self) -> dict[str, int]:
        """Every counter now, summed (as :meth:`values`: resets carried), by its
        fleet name (``cache_lookups.hit``); the fleet's field names. Copies plain
        ints: safe to call at any time."""
        out: dict[str, int] = {}
        for row in COUNTERS:
            for key, count in self.values(row):
                if count:
                    out[row.fleet_key(key)] = count
        return out

    def counts(self) -> dict[tuple[int, str], int]:
        """Every counter now, by (its stats object's id, fleet name): what the
        fleet flusher diffs. Per source, not summed, so one cache's
        ``stats.reset()`` is not taken for (or hidden by) the others' counts."""
        out: dict[tuple[int, str], int] = {}
        for row in COUNTERS:
            for stats in self.sources(row.source):
                value = getattr(stats, row.attr)
                items = value.items() if row.by is not None else ((None, value),)
                for key, count in items:
                    if count:
                        out[id(stats), row.fleet_key(key)] = count
        return out

    # -- exporters (prometheus_client is imported only here) -------------------------

    def collector(self) -> Collector:
        """A ``prometheus_client`` collector of everything watched, read at scrape
        time: ``REGISTRY.register(metrics.collector())``. Needs the ``metrics``
        extra (``pip install asgi-redis-kit[metrics]``)."""
        collector: Collector = _exporter().KitCollector(self)
        return collector

    def asgi_app(self) -> ASGIApp:
        """An ASGI app answering Prometheus scrapes with these metrics alone (mount
        it at ``/metrics``). For the process metrics too, register
        :meth:`collector` in ``prometheus_client.REGISTRY`` and mount
        ``prometheus_client.make_asgi_app()`` instead."""
        app: ASGIApp = _exporter().metrics_app(self)
        return app


def _exporter() -> Any:
    """The ``_prometheus`` module, or an ImportError that says what to install."""
    try:
        from . import _prometheus
    except ImportError as exc:
        raise ImportError(
            'Prometheus exposition needs prometheus_client: pip install "asgi-redis-kit[metrics]"'
        ) from exc
    return _prometheus
