"""Every counter the library keeps, once: its metric name, meaning and where it lives.

One ``Row`` per stats field. The Prometheus collector (``_prometheus``) and the
fleet flusher (``_fleet``) both read this table, so a new field of
``CacheStats``/``SessionStats``/``NearStats`` is one line here and shows up in
both. Names follow Prometheus' conventions: ``asgi_redis_kit_`` prefix (added
by the exporter), ``_total`` for counters (likewise), seconds, and labels from
small closed sets only (outcomes, reasons, operations: never a key, URL, user
or session id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Source = Literal["cache", "session", "near", "redis"]


@dataclass(frozen=True)
class Row:
    """One stats field as (part of) a metric family.

    ``name``: the family, without prefix or ``_total``; ``attr``: the attribute
    on the source's stats object; ``labels``: constant labels of this row
    (several rows share a family, one per outcome); ``by``: the field is a
    ``Counter[str]`` whose keys become this label.
    """

    source: Source
    name: str
    attr: str
    help: str
    labels: dict[str, str] = field(default_factory=dict)
    by: str | None = None

    def fleet_key(self, key: str | None = None) -> str:
        """The row's field name in the fleet's Redis hashes (``cache_lookups.hit``)."""
        parts = [self.name, *self.labels.values()]
        if key is not None:
            parts.append(key)
        return ".".join(parts)


_LOOKUPS = "Cache lookups by outcome (hit, stale, miss, coalesced; bypasses: see reasons)"
_SESSIONS = "Session events by kind"
_NEAR = "Near-cache lookups by outcome"
_DATA = "Data-cache lookups (get, exists, memoized calls) by outcome"

COUNTERS: tuple[Row, ...] = (
    # -- the response cache (CacheStats) -------------------------------------------------
    Row("cache", "http_requests", "requests", "HTTP requests through CacheMiddleware"),
    Row("cache", "cache_lookups", "hits", _LOOKUPS, {"outcome": "hit"}),
    Row("cache", "cache_lookups", "stale", _LOOKUPS, {"outcome": "stale"}),
    Row("cache", "cache_lookups", "misses", _LOOKUPS, {"outcome": "miss"}),
    Row("cache", "cache_lookups", "coalesced", _LOOKUPS, {"outcome": "coalesced"}),
    Row(
        "cache",
        "cache_bypasses",
        "bypass",
        "Requests that skipped the cache, by reason",
        by="reason",
    ),
    Row("cache", "cache_not_modified", "not_modified", "Hits answered 304 Not Modified"),
    Row("cache", "cache_stores", "stores", "Responses stored"),
    Row("cache", "cache_not_stored", "not_stored", "Responses not stored, by reason", by="reason"),
    Row("cache", "cache_refreshes", "refreshes", "Background stale-while-revalidate refreshes"),
    Row("cache", "cache_invalidations", "invalidations", "Invalidations by kind", by="kind"),
    Row(
        "cache",
        "cache_backend_errors",
        "errors",
        "Cache round trips that failed (errors and timeouts)",
    ),
    Row("cache", "cache_near_lookups", "near_hits", _NEAR, {"outcome": "hit"}),
    Row("cache", "cache_near_lookups", "near_misses", _NEAR, {"outcome": "miss"}),
    # -- the data cache: Cache.get/set and @cache.memoize (CacheStats.data_*) ------------
    Row("cache", "cache_data_lookups", "data_hits", _DATA, {"outcome": "hit"}),
    Row("cache", "cache_data_lookups", "data_misses", _DATA, {"outcome": "miss"}),
    Row("cache", "cache_data_lookups", "data_stale", _DATA, {"outcome": "stale"}),
    Row("cache", "cache_data_lookups", "data_coalesced", _DATA, {"outcome": "coalesced"}),
    Row("cache", "cache_data_stores", "data_stores", "Values written (set, memoized results)"),
    Row(
        "cache", "cache_data_refreshes", "data_refreshes", "Background refreshes of memoized values"
    ),
    # -- sessions (SessionStats) ---------------------------------------------------------
    Row("session", "sessions", "loaded", _SESSIONS, {"event": "loaded"}),
    Row("session", "sessions", "not_found", _SESSIONS, {"event": "not_found"}),
    Row("session", "sessions", "created", _SESSIONS, {"event": "created"}),
    Row("session", "sessions", "saved", _SESSIONS, {"event": "saved"}),
    Row("session", "sessions", "touched", _SESSIONS, {"event": "touched"}),
    Row("session", "sessions", "regenerated", _SESSIONS, {"event": "regenerated"}),
    Row("session", "sessions", "cleared", _SESSIONS, {"event": "cleared"}),
    Row("session", "sessions", "revoked", _SESSIONS, {"event": "revoked"}),
    Row(
        "session",
        "session_unavailable",
        "unavailable",
        "Requests answered 503: Redis did not answer",
    ),
    Row(
        "session",
        "session_websocket_closes",
        "websocket_closes",
        "Websockets closed 1013: Redis did not answer",
    ),
    # -- the near cache (NearStats) ------------------------------------------------------
    Row("near", "near_hits", "hits", "Near-cache reads answered from memory"),
    Row("near", "near_misses", "misses", "Near-cache reads sent to Redis"),
    Row(
        "near",
        "near_bypasses",
        "bypasses",
        "Near-cache reads made while tracking was not confirmed",
    ),
    Row("near", "near_stores", "stores", "Values kept in memory"),
    Row(
        "near",
        "near_refused",
        "refused",
        "Values not kept: an invalidation overtook the read, or too big",
    ),
    Row(
        "near",
        "near_invalidations",
        "invalidations",
        "Keys invalidated (by Redis or a local write)",
    ),
    Row("near", "near_flushes", "flushes", "Whole-server drops (FLUSHDB, tracking lost)"),
    Row("near", "near_evictions", "evictions", "Entries evicted by the byte bound"),
    Row("near", "near_expirations", "expirations", "Entries found past their Redis TTL"),
    # -- Redis calls (CallStats of every watched backend) --------------------------------
    Row(
        "redis",
        "redis_call_timeouts",
        "timeouts",
        "Redis calls past their deadline, by operation",
        by="operation",
    ),
    Row(
        "redis",
        "redis_call_errors",
        "errors",
        "Redis calls that failed otherwise, by operation",
        by="operation",
    ),
)
