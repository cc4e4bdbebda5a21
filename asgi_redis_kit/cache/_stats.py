"""CacheStats: the counters a Cache keeps, for a metrics system to read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..near import NearStats


@dataclass
class CacheStats:
    """Counters since the Cache was created. Plain ints and Counters: read them,
    reset them with :meth:`reset`, export them to your metrics system."""

    #: HTTP requests through CacheMiddleware, on @cached routes or not
    requests: int = 0
    hits: int = 0
    misses: int = 0
    stale: int = 0
    not_modified: int = 0
    stores: int = 0
    refreshes: int = 0
    errors: int = 0
    #: answered with another request's response, in flight while Redis failed
    coalesced: int = 0
    bypass: Counter[str] = field(default_factory=Counter)
    not_stored: Counter[str] = field(default_factory=Counter)
    #: ``invalidate_tags`` / ``invalidate`` / ``clear`` calls, by kind
    #: (``tag`` per tag, ``url``, ``namespace``, ``key``: a data-cache ``delete``)
    invalidations: Counter[str] = field(default_factory=Counter)
    #: lookups answered from the near cache with no Redis command (``near_cache=``)
    near_hits: int = 0
    #: lookups the near cache could not answer, sent to Redis while it was usable
    near_misses: int = 0
    #: the data cache (``get``/``exists`` and memoized calls): values found
    #: (stale ones a memoized call revalidates included), and not found
    data_hits: int = 0
    data_misses: int = 0
    #: memoized calls answered with a stale value (revalidating, or the
    #: function failed inside ``stale_if_error``)
    data_stale: int = 0
    #: values written (``set``, ``set_many``, memoized results)
    data_stores: int = 0
    #: memoized calls answered by another call's run in this process
    data_coalesced: int = 0
    #: background refreshes of stale memoized values
    data_refreshes: int = 0
    #: the NearCache's own counters (shared by everyone using that NearCache;
    #: ``reset()`` leaves them), or None without a near cache
    near: NearStats | None = None

    def reset(self) -> None:
        self.requests = self.hits = self.misses = self.stale = self.not_modified = 0
        self.stores = self.refreshes = self.errors = self.coalesced = 0
        self.near_hits = self.near_misses = 0
        self.data_hits = self.data_misses = self.data_stale = self.data_stores = 0
        self.data_coalesced = self.data_refreshes = 0
        self.bypass.clear()
        self.not_stored.clear()
        self.invalidations.clear()

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "hits": self.hits,
            "misses": self.misses,
            "stale": self.stale,
            "not_modified": self.not_modified,
            "stores": self.stores,
            "refreshes": self.refreshes,
            "errors": self.errors,
            "coalesced": self.coalesced,
            "bypass": dict(self.bypass),
            "not_stored": dict(self.not_stored),
            "invalidations": dict(self.invalidations),
            "near_hits": self.near_hits,
            "near_misses": self.near_misses,
            "data_hits": self.data_hits,
            "data_misses": self.data_misses,
            "data_stale": self.data_stale,
            "data_stores": self.data_stores,
            "data_coalesced": self.data_coalesced,
            "data_refreshes": self.data_refreshes,
            "near": None if self.near is None else self.near.as_dict(),
        }
