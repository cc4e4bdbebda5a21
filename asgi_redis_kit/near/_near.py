"""NearCache and NearView: values of Redis keys kept in process memory, safely.

A near cache may answer from memory only what Redis would answer right now, up
to the invalidation lag. Four things make that hold here:

1. **Tracking, confirmed.** Each Redis node a client talks to has one
   :class:`~asgi_redis_kit.near._tracker.Tracker` (a dedicated connection in
   BCAST tracking mode for the registered prefixes). A view is *usable* only
   while every tracker of its client has confirmed ``CLIENT TRACKING`` and
   ``SUBSCRIBE``; otherwise ``get`` and ``begin`` return ``None`` and the caller
   goes to Redis (bypass). Losing tracking flushes every entry of that client.
2. **No read older than an invalidation.** The read reply and the invalidation
   arrive on different connections, so a reply can be overtaken:
   [read] GET -> [other] SET -> [tracker] invalidate -> [read] old reply. So
   ``begin`` registers the keys as pending before the read is sent, an
   invalidation of a pending key bumps its version, and ``put`` stores only if
   the version is still the one seen by ``begin``. A flush or a loss of tracking
   bumps the domain's *epoch*, which refuses every older ticket at once. An
   invalidation that arrives after ``put`` simply evicts the entry.
3. **TTL-exact.** The caller reads the PTTL with the value (one round trip), and
   the local deadline is ``min(PTTL, max_ttl)``: Redis announces an expiry only
   when it gets round to deleting the key, and a lost invalidation we did not
   notice is bounded by ``max_ttl``.
4. **Our own writes** go through :meth:`NearView.invalidate`, so a request
   that writes and then reads sees its write without waiting for the
   round trip of its own invalidation.

Sharing. A *domain* is one server identity on one event loop: ``("tcp", host,
port, db, user)``, ``("unix", path, db, user)``, ``("sentinel", service, db,
user)`` or ``("cluster", sorted startup nodes, user)``. Every view of the same
domain shares its trackers and entries, whatever client object or prefix it was
made from; registering a prefix not yet covered re-registers the trackers
(which flushes: the new prefix had no tracking until now). Overlapping prefixes
are not allowed on one BCAST connection, so only the shortest of overlapping
prefixes is registered; it covers the others.

Cluster: one tracker per primary (``client.get_primaries()``), since tracking
and its redirect are per node. Every heartbeat compares that set with the
trackers; a change (a failover, a resharding that added a node) flushes the
domain and tracks the new primaries. The set is the client's own idea of the
topology (we never ask the cluster ourselves): a primary that dies keeps the
domain bypassing until it is back, or until the client has learnt of its
replacement from a MOVED or a failed command. Sentinel: the tracker's connection asks
Sentinel for the master when it connects, and every heartbeat checks that the
master is still where it connected (a demoted master still answers PING but
no longer receives the writes).

Event loops: trackers are tasks of the loop that made the view, so a view made
on another loop gets its own domain. When a loop closes without
:meth:`NearCache.aclose` (``asyncio.run`` cancels the trackers first, which
then close their connections), the domain is dropped on the next ``view()``;
a loop closed with its trackers still pending gets their sockets closed there,
as ``asgi_redis_kit._redis`` does for its per-loop clients.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError

from asgi_redis_kit.near._store import NearStats, Store
from asgi_redis_kit.near._tracker import Tracker, _Lost, close_socket


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"

    def __reduce__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()
"""The value of a :class:`NearHit` for a key Redis does not have."""


class NearHit(NamedTuple):
    value: object
    # loop.time() of the view's loop after which the entry is no longer served.
    expires_at: float
    # Milliseconds left until then, when get() answered (at least 1).
    remaining_ms: int


class Ticket:
    """A read in flight: the domain epoch and key versions ``begin`` saw."""

    __slots__ = ("closed", "epoch", "versions")

    def __init__(self, epoch: int, versions: dict[str, int]) -> None:
        self.epoch = epoch
        self.versions = versions
        self.closed = False


_domain_ids = itertools.count(1)


class _Domain:
    """One server identity on one loop: its trackers, prefixes, epoch and pending reads."""

    def __init__(
        self,
        near: NearCache,
        identity: tuple[Any, ...],
        client: Redis | RedisCluster,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.id = next(_domain_ids)
        self.near = near
        self.identity = identity
        self.client = client
        self.loop = loop
        self.prefixes: list[str] = []
        self.epoch = 0
        # key -> [reads in flight, version]; the version moves on every invalidation.
        self.pending: dict[str, list[int]] = {}
        self.trackers: dict[str, Tracker] = {}
        self.usable = False
        self.closed = False
        self.watcher: asyncio.Task[None] | None = None
        self.views: dict[str, NearView] = {}

    # Prefixes ----------------------------------------------------------

    def add_prefix(self, prefix: str) -> None:
        if any(prefix.startswith(p) for p in self.prefixes):
            return  # already covered
        self.prefixes = [p for p in self.prefixes if not p.startswith(prefix)] + [prefix]
        self.prefixes.sort()
        if not self.trackers:
            self._start()
        else:
            self._lose()
            for tracker in self.trackers.values():
                tracker.retrack()

    # Trackers ----------------------------------------------------------

    def _start(self) -> None:
        client = self.client
        if isinstance(client, RedisCluster):
            for node in client.get_primaries():
                self._track_node(node.name, node.connection_class, node.connection_kwargs)
            self.watcher = self.loop.create_task(
                self._watch_primaries(client), name="asgi_redis_kit near-cache cluster watch"
            )
        else:
            pool = client.connection_pool
            kwargs = pool.connection_kwargs
            if isinstance(pool, SentinelConnectionPool):
                name = f"sentinel:{pool.service_name}"
                check = _still_master(pool)
            else:
                name = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
                check = None
            self._track_node(name, pool.connection_class, kwargs, check)

    def _track_node(
        self,
        name: str,
        connection_class: type[AbstractConnection],
        kwargs: dict[str, Any],
        check: Any = None,
    ) -> None:
        options = {**kwargs, "protocol": 2, "decode_responses": False}

        def connect() -> AbstractConnection:
            return connection_class(**options)

        self.trackers[name] = Tracker(
            name,
            connect=connect,
            prefixes=lambda: self.prefixes,
            on_up=self._tracker_up,
            on_lost=self._tracker_lost,
            on_invalidate=self.on_invalidate,
            on_state=self._tracker_state,
            heartbeat=self.near.heartbeat,
            heartbeat_timeout=self.near.heartbeat_timeout,
            check=check,
        )

    async def _watch_primaries(self, client: RedisCluster) -> None:
        while True:
            await asyncio.sleep(self.near.heartbeat)
            try:
                names = {node.name: node for node in client.get_primaries()}
            except Exception:  # noqa: S112 -- the client is mid-reinitialisation: ask next time
                continue
            if not names or set(names) == set(self.trackers):
                continue  # none known (between two topologies) is no news
            self._lose()
            for name in set(self.trackers) - set(names):
                tracker = self.trackers.pop(name)
                self.near.stats.tracking.pop(name, None)
                await tracker.aclose()
                self.near.stats.tracking.pop(name, None)
            for name in set(names) - set(self.trackers):
                node = names[name]
                self._track_node(name, node.connection_class, node.connection_kwargs)
            # Only nodes gone: the others never stopped tracking.
            self._tracker_up(None)

    def _tracker_state(self, tracker: Tracker) -> None:
        if self.trackers.get(tracker.name) is tracker:
            self.near.stats.tracking[tracker.name] = tracker.state
            if tracker.state == "closed":  # cancelled: its loop is shutting down
                self.closed = True
                self._lose()

    def _tracker_up(self, tracker: Tracker | None) -> None:
        if self.trackers and all(t.tracking for t in self.trackers.values()):
            # New epoch: nothing read before this point may be stored.
            self.epoch += 1
            self.usable = True

    def _tracker_lost(self, tracker: Tracker) -> None:
        self._lose()

    def _lose(self) -> None:
        """Stop serving and forget everything: some invalidation may be missed."""
        was, self.usable = self.usable, False
        self.flush(count=was)

    # Invalidations -----------------------------------------------------

    def flush(self, *, count: bool = True) -> None:
        self.epoch += 1
        self.near._store.flush(self.id)
        if count:  # not again for each failed reconnect
            self.near.stats.flushes += 1

    def on_invalidate(self, keys: Iterable[str] | None) -> None:
        if keys is None:  # FLUSHDB / FLUSHALL
            self.flush()
            return
        store = self.near._store
        stats = self.near.stats
        pending = self.pending
        for key in keys:
            stats.invalidations += 1
            store.discard(self.id, key)
            state = pending.get(key)
            if state is not None:
                state[1] += 1

    async def aclose(self) -> None:
        self.closed = True
        self.usable = False
        tasks: list[asyncio.Task[None]] = [t.task for t in self.trackers.values()]
        for tracker in self.trackers.values():
            tracker.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
            tasks.append(self.watcher)
        await asyncio.gather(*tasks, return_exceptions=True)
        self.near._store.flush(self.id)
        for name in self.trackers:
            self.near.stats.tracking.pop(name, None)
        self.trackers.clear()

    def drop_dead(self) -> None:
        """The loop closed with trackers still pending: close their sockets here."""
        self.closed = True
        self.usable = False
        for tracker in self.trackers.values():
            close_socket(tracker.connection)
            self.near.stats.tracking.pop(tracker.name, None)
        self.near._store.flush(self.id)
        self.trackers.clear()


def _still_master(pool: SentinelConnectionPool) -> Any:
    async def check(connection: AbstractConnection) -> None:
        try:
            address = await pool.get_master_address()  # type: ignore[no-untyped-call]
        except (RedisError, OSError):
            return  # Sentinel unreachable: the server's own answers decide
        here = (getattr(connection, "host", None), getattr(connection, "port", None))
        if tuple(address) != here:
            raise _Lost(f"the master moved to {address[0]}:{address[1]}")

    return check


# A client's identity is computed once: a cluster client's known nodes change
# as it learns the topology, and the same client must keep meeting its domain.
_identities: weakref.WeakKeyDictionary[Redis | RedisCluster, tuple[Any, ...]] = (
    weakref.WeakKeyDictionary()
)


def _identity(client: Redis | RedisCluster) -> tuple[Any, ...]:
    identity = _identities.get(client)
    if identity is None:
        identity = _identities[client] = _compute_identity(client)
    return identity


def _compute_identity(client: Redis | RedisCluster) -> tuple[Any, ...]:
    if isinstance(client, RedisCluster):
        known = client.nodes_manager.startup_nodes.values()
        nodes = tuple(sorted(node.name for node in known))
        user = client.connection_kwargs.get("username")
        return ("cluster", nodes, user)
    pool = client.connection_pool
    kw = pool.connection_kwargs
    db = kw.get("db", 0)
    user = kw.get("username")
    if isinstance(pool, SentinelConnectionPool):
        return ("sentinel", pool.service_name, db, user)
    if kw.get("path"):
        return ("unix", kw["path"], db, user)
    return ("tcp", kw.get("host", "localhost"), kw.get("port", 6379), db, user)


class NearCache:
    """A process-local copy of Redis keys, kept correct by Redis server-assisted
    client-side caching (see the module docstring for what is guaranteed).

    Parameters:
        max_bytes: the memory bound for all entries of all views together.
        max_entry_bytes: a larger value (the caller's size estimate) is not kept.
        max_ttl: the longest any entry is kept, in seconds, whatever its PTTL.
        heartbeat: seconds between the trackers' PINGs.
        heartbeat_timeout: a PING unanswered this long means tracking is lost.
    """

    _shared: NearCache | None = None
    _shared_lock = threading.Lock()

    def __init__(
        self,
        *,
        max_bytes: int = 64 * 2**20,
        max_entry_bytes: int = 2**20,
        max_ttl: float = 300.0,
        heartbeat: float = 1.0,
        heartbeat_timeout: float = 1.0,
    ) -> None:
        for name, value in (("max_bytes", max_bytes), ("max_entry_bytes", max_entry_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
        if max_entry_bytes > max_bytes:
            raise ValueError(
                f"max_entry_bytes ({max_entry_bytes!r}) must not exceed max_bytes ({max_bytes!r})"
            )
        for name, seconds in (
            ("max_ttl", max_ttl),
            ("heartbeat", heartbeat),
            ("heartbeat_timeout", heartbeat_timeout),
        ):
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not 0 < seconds < float("inf")
            ):
                raise ValueError(f"{name} must be a positive number of seconds, got {seconds!r}")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.max_ttl = float(max_ttl)
        self.heartbeat = float(heartbeat)
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.stats = NearStats()
        self._store = Store(max_bytes, self.stats)
        self._domains: dict[tuple[asyncio.AbstractEventLoop, tuple[Any, ...]], _Domain] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<NearCache max_bytes={self.max_bytes} entries={self.stats.entries} "
            f"domains={len(self._domains)}>"
        )

    @classmethod
    def shared(cls) -> NearCache:
        """The process-wide default instance (what ``near_cache=True`` uses)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def view(self, client: Redis | RedisCluster, prefix: str) -> NearView:
        """The view of ``client``'s keys under ``prefix``, for the running loop.

        Starts tracking on first use (the view is not usable until Redis has
        confirmed it); a new prefix on a tracked server re-registers (flush).
        """
        if not isinstance(client, Redis | RedisCluster):
            raise TypeError(
                f"view() takes a redis.asyncio Redis or RedisCluster client, got {client!r}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r}")
        loop = asyncio.get_running_loop()
        identity = _identity(client)
        with self._lock:
            self._drop_dead()
            domain = self._domains.get((loop, identity))
            if domain is None or domain.closed:
                domain = self._domains[(loop, identity)] = _Domain(self, identity, client, loop)
            view = domain.views.get(prefix)
            if view is None:
                domain.add_prefix(prefix)
                view = domain.views[prefix] = NearView(domain, prefix)
            return view

    def _drop_dead(self) -> None:
        for key, domain in list(self._domains.items()):
            if domain.loop.is_closed():
                domain.drop_dead()
                del self._domains[key]
            elif domain.closed:
                del self._domains[key]

    async def aclose(self) -> None:
        """Stop every tracker and forget every entry. Trackers of other running
        loops are cancelled there; a later ``view()`` starts afresh."""
        loop = asyncio.get_running_loop()
        with self._lock:
            domains = list(self._domains.values())
            self._domains.clear()
        for domain in domains:
            if domain.loop is loop:
                await domain.aclose()
            elif domain.loop.is_closed():
                domain.drop_dead()
            else:
                domain.closed = domain.usable = False
                for tracker in domain.trackers.values():
                    domain.loop.call_soon_threadsafe(tracker.cancel)
                if domain.watcher is not None:
                    domain.loop.call_soon_threadsafe(domain.watcher.cancel)
        self._store.clear()


class NearView:
    """One prefix of one server, as seen from one event loop. Made by
    :meth:`NearCache.view`; every method is synchronous and costs no I/O.

    Keys are full Redis keys (str); a key outside the view's prefix is never
    kept. A view outlives nothing: after :meth:`NearCache.aclose`, or once its
    loop has finished, it is never usable again; ``view()`` is a few dict
    lookups, so callers may simply ask for the view on each request."""

    __slots__ = ("_domain", "_store", "max_entry_bytes", "max_ttl", "prefix", "stats")

    def __init__(self, domain: _Domain, prefix: str) -> None:
        self._domain = domain
        self._store = domain.near._store
        self.prefix = prefix
        self.stats = domain.near.stats
        self.max_ttl = domain.near.max_ttl
        self.max_entry_bytes = domain.near.max_entry_bytes

    def __repr__(self) -> str:
        return f"<NearView {self.prefix!r} usable={self.usable}>"

    @property
    def usable(self) -> bool:
        """Tracking is confirmed on every node of this view's client."""
        return self._domain.usable

    def get(self, key: str) -> NearHit | None:
        """The local copy of ``key``, or ``None`` (unknown here, expired, or the
        view is not usable). ``NearHit.value`` is :data:`ABSENT` when Redis had
        no such key."""
        domain = self._domain
        if not domain.usable:
            self.stats.bypasses += 1
            return None
        now = domain.loop.time()
        entry = self._store.get(domain.id, key, now)
        if entry is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return NearHit(entry.value, entry.expires_at, max(1, int((entry.expires_at - now) * 1000)))

    def begin(self, keys: Sequence[str]) -> Ticket | None:
        """Call before sending the read of ``keys``; ``None`` when not usable
        (then there is nothing to ``put`` or ``end``, but both accept ``None``)."""
        domain = self._domain
        if not domain.usable:
            return None
        pending = domain.pending
        versions: dict[str, int] = {}
        for key in keys:
            if key in versions:
                continue
            state = pending.get(key)
            if state is None:
                state = pending[key] = [0, 0]
            state[0] += 1
            versions[key] = state[1]
        return Ticket(domain.epoch, versions)

    def put(self, ticket: Ticket | None, key: str, value: object, pttl_ms: int, size: int) -> None:
        """Keep ``value`` of ``key`` as read under ``ticket``, unless an
        invalidation, a flush or a loss of tracking came since ``begin``.

        ``pttl_ms`` is the key's PTTL read with the value: -2 (no such key:
        ``value`` is ignored and :data:`ABSENT` kept), -1 (no TTL: kept
        ``max_ttl``) or the milliseconds left (kept ``min(pttl, max_ttl)``).
        ``size`` is the caller's estimate of the value's bytes; above
        ``max_entry_bytes`` nothing is kept.
        """
        if ticket is None or ticket.closed:
            return
        domain = self._domain
        state = domain.pending.get(key)
        if (
            not domain.usable
            or ticket.epoch != domain.epoch
            or state is None
            or ticket.versions.get(key) != state[1]
            or not key.startswith(self.prefix)
        ):
            self.stats.refused += 1
            return
        if size > self.max_entry_bytes:
            # Too big to keep, and any copy we hold is older than this read.
            self._store.discard(domain.id, key)
            self.stats.refused += 1
            return
        if pttl_ms == -2:
            value, ttl = ABSENT, self.max_ttl
        elif pttl_ms == -1:
            ttl = self.max_ttl
        elif pttl_ms > 0:
            ttl = min(pttl_ms / 1000, self.max_ttl)
        else:
            self.stats.refused += 1
            return
        if self._store.put(domain.id, key, value, domain.loop.time() + ttl, size):
            self.stats.stores += 1
        else:
            self.stats.refused += 1

    def end(self, ticket: Ticket | None) -> None:
        """Release what ``begin`` registered (call it in a ``finally``)."""
        if ticket is None or ticket.closed:
            return
        ticket.closed = True
        pending = self._domain.pending
        for key in ticket.versions:
            state = pending.get(key)
            if state is None:
                continue
            state[0] -= 1
            if state[0] <= 0:
                del pending[key]

    def invalidate(self, keys: Iterable[str]) -> None:
        """We wrote ``keys``: drop them here now, as an invalidation would."""
        self._domain.on_invalidate(list(keys))
