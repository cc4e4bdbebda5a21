"""The per-server state of the near cache: a *domain* and how a client maps to one.

It owns, for one server identity on one event loop, the trackers (one per
node), the registered prefixes, the epoch and the pending reads, and turns the
trackers' news (up, lost, invalidations) into flushes and version bumps.
:class:`~asgi_redis_kit.near._near.NearCache` and ``NearView`` (``_near.py``)
are the public face; this module is what they share.

A *domain* is one server identity on one event loop: ``("tcp", host,
port, db, user, *enc)``, ``("unix", path, db, user, *enc)``, ``("sentinel",
service, db, user, *enc)`` or ``("cluster", sorted startup nodes, user,
*enc)``, where ``enc`` is the client's key encoding and its error handler. Every view of the same
domain shares its trackers and entries, whatever client object or prefix it was
made from; registering a prefix not yet covered re-registers the trackers
(which flushes: the new prefix had no tracking until now). Overlapping prefixes
are not allowed on one BCAST connection, so only the shortest of overlapping
prefixes is registered; it covers the others.

Cluster: one tracker per primary (``client.get_primaries()``), since tracking
and its redirect are per node. Every heartbeat compares that set with the
trackers; a change (a failover, a resharding that added a node) flushes the
domain and tracks the new primaries. The set is the client's own idea of the
topology; while a tracker is lost, each heartbeat also has the client refresh
it (``nodes_manager.initialize()``), so a dead primary's replacement is tracked
even when no request goes to its slots; until then the domain bypasses. Sentinel: the tracker's
connection asks Sentinel for the master when it connects, and the checks of
``_checks.py`` (when tracking is confirmed, then every heartbeat) make sure the
master is still where it connected (a demoted master still answers PING but no
longer receives the writes). On one server or Sentinel (not a cluster) they
also count SWAPDB calls, which Redis announces to no tracking client.

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
import math
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelConnectionPool

from asgi_redis_kit._clients import close_socket
from asgi_redis_kit.near._checks import Check, NoSwapdb, StillMaster
from asgi_redis_kit.near._tracker import Tracker

if TYPE_CHECKING:
    from asgi_redis_kit.near._near import NearCache, NearView


_domain_ids = itertools.count(1)


# Prefixes registered (tracked) per domain, and views remembered per domain
# (a view under a registered prefix costs nothing to make again).
MAX_PREFIXES = 64
MAX_VIEWS = 1024
# Seconds aclose() waits for its trackers to stop before closing their sockets itself.
STOP_WAIT = 5.0


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
        # How the client turns key str into bytes, which the tracker reverses.
        # A lossy error handler ("replace") maps several str to one key: the
        # view keeps only keys that come back as themselves.
        self.encoding: str = identity[-2]
        self.encoding_errors: str = identity[-1]
        self.lossy_keys = self.encoding_errors not in ("strict", "surrogateescape")
        self.client = client
        self.loop = loop
        self.prefixes: list[str] = []
        self.epoch = 0
        # key -> [reads in flight, version]; the version moves on every invalidation.
        self.pending: dict[str, list[int]] = {}
        self.trackers: dict[str, Tracker] = {}
        self.usable = False
        # loop.time() after which no entry is served until a tracker is heard
        # from again: a loop blocked (or a tracker starved) for longer than
        # heartbeat + heartbeat_timeout may have invalidations waiting unread.
        self.trusted_until = -math.inf
        self.closed = False
        self.started = False
        self.watcher: asyncio.Task[None] | None = None
        self.views: dict[str, NearView] = {}
        # Whether a prefix past MAX_PREFIXES was refused (and said so) already.
        self.refused_prefix = False

    # Prefixes ----------------------------------------------------------

    def add_prefix(self, prefix: str) -> bool:
        """Track ``prefix`` too; False (nothing changes) past :data:`MAX_PREFIXES`."""
        if any(prefix.startswith(p) for p in self.prefixes):
            return True  # already covered
        if len(self.prefixes) >= MAX_PREFIXES:
            # Each one costs a flush, a reconnect, and Redis a check per write:
            # a prefix made per tenant or per user belongs under a shared one.
            return False
        self.prefixes = [p for p in self.prefixes if not p.startswith(prefix)] + [prefix]
        self.prefixes.sort()
        if not self.started:
            self._start()
        else:  # (a cluster client may know no primaries yet: its watch adds them)
            self._lose()
            for tracker in self.trackers.values():
                tracker.retrack()
        return True

    # Trackers ----------------------------------------------------------

    def _start(self) -> None:
        self.started = True
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
                checks: list[Check] = [StillMaster(pool)]
            else:
                name = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
                checks = []
            # Not on a cluster: it has one db, and no SWAPDB.
            self._track_node(name, pool.connection_class, kwargs, checks, swapdb=True)

    def _track_node(
        self,
        name: str,
        connection_class: type[AbstractConnection],
        kwargs: dict[str, Any],
        checks: list[Check] | None = None,
        *,
        swapdb: bool = False,
    ) -> None:
        options = {**kwargs, "protocol": 2, "decode_responses": False}

        def connect() -> AbstractConnection:
            return connection_class(**options)

        checks = list(checks or ())
        if swapdb:
            checks.append(NoSwapdb(connect))

        # Until this node's tracker confirms, its keys' changes go unheard: no
        # other tracker coming up meanwhile may make the domain usable again.
        self.usable = False
        self.trackers[name] = Tracker(
            name,
            connect=connect,
            prefixes=lambda: self.prefixes,
            on_up=self._tracker_up,
            on_lost=self._tracker_lost,
            on_invalidate=self.on_invalidate,
            on_state=self._tracker_state,
            on_alive=self._tracker_alive,
            heartbeat=self.near.heartbeat,
            heartbeat_timeout=self.near.heartbeat_timeout,
            checks=checks,
            encoding=self.encoding,
        )

    async def _watch_primaries(self, client: RedisCluster) -> None:
        while True:
            await asyncio.sleep(self.near.heartbeat)
            try:
                if not all(t.tracking for t in self.trackers.values()):
                    # A lost primary may have been replaced; the client learns
                    # that only from a command to its slots, which an app whose
                    # traffic is elsewhere never sends: ask the cluster now.
                    await client.nodes_manager.initialize()
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
            self._tracker_alive(None)

    def _tracker_alive(self, tracker: Tracker | None) -> None:
        heard = min((t.heard_at for t in self.trackers.values()), default=-math.inf)
        self.trusted_until = heard + self.near.heartbeat + self.near.heartbeat_timeout

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
        # Bounded: a shutdown (lifespan, a test's teardown) must never hang on a
        # tracker that missed its cancel (Python 3.11's wait_for can swallow one);
        # one still running then has its socket closed here and is cancelled again.
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=STOP_WAIT)
            for task in late:
                task.cancel()
            for tracker in self.trackers.values():
                if tracker.task in late:
                    close_socket(tracker.connection)
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
        kw = client.connection_kwargs
        known = client.nodes_manager.startup_nodes.values()
        # Not the client object: clients made and closed in turn on one loop
        # would each keep a domain, its trackers and connections, for good. The
        # domain learns the topology from the first client, though: see the
        # README on passing the cache and the sessions one RedisCluster.
        where: tuple[Any, ...] = ("cluster", tuple(sorted(node.name for node in known)))
    else:
        pool = client.connection_pool
        kw = pool.connection_kwargs
        db = kw.get("db", 0)
        if isinstance(pool, SentinelConnectionPool):
            # The service name alone is not a server: two deployments may both
            # call theirs "mymaster". Its Sentinels say which one it is.
            sentinels = tuple(
                sorted(
                    (str(o.get("host", "localhost")), int(o.get("port", 26379)))
                    for o in (
                        s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels
                    )
                )
            )
            where = ("sentinel", pool.service_name, sentinels, db)
        elif kw.get("path"):
            where = ("unix", kw["path"], db)
        else:
            where = ("tcp", kw.get("host", "localhost"), kw.get("port", 6379), db)
    # The key encoding is part of it: the tracker decodes keys for every view.
    encoding = (kw.get("encoding", "utf-8"), kw.get("encoding_errors", "strict"))
    return (*where, kw.get("username"), *encoding)
