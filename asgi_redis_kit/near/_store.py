"""The near cache's memory: one byte-bounded LRU shared by every view, with local expiry.

It owns entries and the numbers about them, nothing about Redis. Each entry
belongs to a *domain* (one Redis server, Sentinel service or cluster, on one
event loop; see ``_near.py``), so losing a domain's tracking drops exactly its
entries and no one else's.

- **Bounded in bytes, across all views.** A count bound (cashews' 10 000 keys,
  frappe's 1024) says nothing about memory when one entry is a 300-byte session
  and the next a 900 KB page. The caller gives its own size estimate of the
  decoded value; we add the key and a fixed per-entry overhead and evict least
  recently used entries until the total fits ``max_bytes``.
- **Local expiry.** Redis announces an expiry only when it actually deletes the
  key (lazily, or by its sampling active expiry), which can be late; so every
  entry carries its own deadline, copied from the PTTL read with the value and
  capped by ``max_ttl``, and an entry past it is never returned. Expired entries
  are dropped when touched, and are the LRU's first victims by their nature
  (nobody reads them).
- **Thread-safe.** One NearCache serves the loops of several threads (each
  with its own domains), and an LRU update is several steps (unlink, evict,
  link, count) that a thread switch must not split: every operation holds one
  lock, uncontended in the usual one-loop process (a few tens of ns).
- Deadlines are ``loop.time()`` values of the domain's loop: monotonic, and the
  one clock the caller compares them with.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Bytes counted per entry on top of the caller's size and the key: the entry
# object, the OrderedDict node and the index set slot, roughly, on CPython 3.11.
ENTRY_OVERHEAD = 200


@dataclass(slots=True)
class Entry:
    value: object
    expires_at: float
    size: int


@dataclass
class NearStats:
    """What the near cache did, process-wide (all views, all loops).

    ``hits``/``misses`` count :meth:`NearView.get` answers while the view was
    usable; ``bypasses`` count the calls made while it was not (tracking not
    confirmed: the caller went to Redis). ``stores`` are accepted ``put`` calls,
    ``refused`` the puts dropped because an invalidation, a flush or a loss of
    tracking overtook the read (or the entry was too big). ``invalidations`` are
    keys invalidated (by Redis or by :meth:`NearView.invalidate`), ``flushes``
    whole-domain drops (FLUSHDB/FLUSHALL, tracking lost, re-registration),
    ``evictions`` entries pushed out by the byte bound, ``expirations`` entries
    found past their local deadline. ``bytes`` and ``entries`` are current
    totals. ``tracking`` maps each tracked node (``"host:port"``, or the Sentinel
    service) to its state: ``"connecting"``, ``"tracking"``, ``"lost"``,
    ``"closed"`` (one name per node: with one node tracked from two loops at
    once, the last state reported wins).
    """

    hits: int = 0
    misses: int = 0
    bypasses: int = 0
    stores: int = 0
    refused: int = 0
    invalidations: int = 0
    flushes: int = 0
    evictions: int = 0
    expirations: int = 0
    bytes: int = 0
    entries: int = 0
    tracking: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "bypasses": self.bypasses,
            "stores": self.stores,
            "refused": self.refused,
            "invalidations": self.invalidations,
            "flushes": self.flushes,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "bytes": self.bytes,
            "entries": self.entries,
            "tracking": dict(self.tracking),
        }


class Store:
    """Entries keyed by ``(domain, key)``, least recently used first."""

    def __init__(self, max_bytes: int, stats: NearStats) -> None:
        self.max_bytes = max_bytes
        self.stats = stats
        self._entries: OrderedDict[tuple[int, str], Entry] = OrderedDict()
        # Each domain's keys, so a flush costs its own entries, not a scan of all.
        self._by_domain: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def get(self, domain: int, key: str, now: float) -> Entry | None:
        with self._lock:
            return self._get(domain, key, now)

    def get_many(self, domain: int, keys: Sequence[str], now: float) -> list[object]:
        """The values of ``keys`` in order, up to the first one not here."""
        found: list[object] = []
        with self._lock:
            for key in keys:
                entry = self._get(domain, key, now)
                if entry is None:
                    break
                found.append(entry.value)
        return found

    def _get(self, domain: int, key: str, now: float) -> Entry | None:
        slot = (domain, key)
        entry = self._entries.get(slot)
        if entry is None:
            return None
        if entry.expires_at <= now:
            self._remove(slot, entry)
            self.stats.expirations += 1
            return None
        self._entries.move_to_end(slot)
        return entry

    def put(self, domain: int, key: str, value: object, expires_at: float, size: int) -> bool:
        """Store; whether it fits at all (an entry larger than the whole bound does not)."""
        with self._lock:
            return self._put(domain, key, value, expires_at, size)

    def _put(self, domain: int, key: str, value: object, expires_at: float, size: int) -> bool:
        size += len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            self._discard(domain, key)
            return False
        slot = (domain, key)
        old = self._entries.get(slot)
        if old is not None:
            self._remove(slot, old)
        while self.stats.bytes + size > self.max_bytes and self._entries:
            victim, entry = next(iter(self._entries.items()))
            self._remove(victim, entry)
            self.stats.evictions += 1
        self._entries[slot] = Entry(value, expires_at, size)
        self._by_domain.setdefault(domain, set()).add(key)
        self.stats.bytes += size
        self.stats.entries += 1
        return True

    def discard(self, domain: int, key: str) -> bool:
        with self._lock:
            return self._discard(domain, key)

    def _discard(self, domain: int, key: str) -> bool:
        slot = (domain, key)
        entry = self._entries.get(slot)
        if entry is None:
            return False
        self._remove(slot, entry)
        return True

    def flush(self, domain: int) -> int:
        """Drop every entry of ``domain``; how many there were."""
        with self._lock:
            keys = self._by_domain.pop(domain, set())
            for key in keys:
                entry = self._entries.pop((domain, key))
                self.stats.bytes -= entry.size
                self.stats.entries -= 1
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_domain.clear()
            self.stats.bytes = self.stats.entries = 0

    def _remove(self, slot: tuple[int, str], entry: Entry) -> None:
        del self._entries[slot]
        keys = self._by_domain[slot[0]]
        keys.discard(slot[1])
        if not keys:
            del self._by_domain[slot[0]]
        self.stats.bytes -= entry.size
        self.stats.entries -= 1
