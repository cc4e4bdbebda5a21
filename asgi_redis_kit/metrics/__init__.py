"""Monitoring: the library's counters for Prometheus, and summed across the fleet in Redis.

::

    metrics = Metrics()                                  # pass as metrics= to the middlewares
    app.mount("/metrics", metrics.asgi_app())            # Prometheus scrapes (extra "metrics")
    async with FleetFlusher(metrics, redis_url):         # in the lifespan
        ...
    fleet = await fleet_stats(redis_url, minutes=15)     # any instance: the whole fleet

Module map: ``_catalog`` (every counter: name, meaning, where it lives),
``_hub`` (``Metrics``: what is watched), ``_prometheus`` (the collector and the
ASGI app; the only module that imports ``prometheus_client``), ``_fleet`` (the
flusher and ``fleet_stats``). See the README's Monitoring section for the names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._catalog import COUNTERS, Row
from ._fleet import FleetFlusher, FleetStats, InstanceStats, fleet_stats, hit_ratio, lookups
from ._hub import Metrics

if TYPE_CHECKING:
    from ._prometheus import KitCollector

__all__ = [
    "COUNTERS",
    "FleetFlusher",
    "FleetStats",
    "InstanceStats",
    "KitCollector",
    "Metrics",
    "Row",
    "fleet_stats",
    "hit_ratio",
    "lookups",
]


def __getattr__(name: str) -> Any:
    # KitCollector needs prometheus_client (the "metrics" extra): imported on use only.
    if name == "KitCollector":
        from ._prometheus import KitCollector

        return KitCollector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
