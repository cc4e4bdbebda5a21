"""CacheStats: the counters a Cache keeps, for a metrics system to read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CacheStats:
    """Counters since the Cache was created. Plain ints and Counters: read them,
    reset them with :meth:`reset`, export them to your metrics system."""

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

    def reset(self) -> None:
        self.hits = self.misses = self.stale = self.not_modified = 0
        self.stores = self.refreshes = self.errors = self.coalesced = 0
        self.bypass.clear()
        self.not_stored.clear()

    def as_dict(self) -> dict[str, Any]:
        return {
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
        }
