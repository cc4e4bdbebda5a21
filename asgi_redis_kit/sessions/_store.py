"""SessionStore, the Redis side of sessions: loading, saving and replacing a session,
and the protocol by which revoke, logout and expiry win over requests in flight.

Idle timeout is the key's TTL. The absolute lifetime is enforced from ``m:created``
on load and by never setting a TTL that reaches past it. A *successor* -- the new
record of ``regenerate()``, or of ``clear()`` then ``bind_user()`` of the user the
loaded record was bound to -- keeps the creation time of the session it continues:
rotating the id never extends the lifetime. A login (bound to another user, or from
an anonymous session) starts a new one. Every TTL refresh of a bound session makes
its index live at least as long (the index's TTL is set when an id is added, maybe
by a store with a shorter absolute lifetime).

Revoke, logout and expiry win over every request in flight
----------------------------------------------------------

A request loads a session, and while it runs the session is revoked
(``revoke_user``, ``revoke_session``), logged out by another request, or expires.
Whatever the request then does, it must not bring the session back, nor hand out a
copy of it. On Cluster the session, its replacement and the user index live in three
slots, so no script can see them together; the protocol below holds with any
interleaving of commands. A request that fails half-way (an error reply, a timeout)
leaves at worst a stale index entry, a new record whose id was never sent, or a
logged-out user; never a record that a cookie points to, bound but missing from its
index.

Invariants:

1. A live record bound to a user is in that user's index (the index is a
   superset). So an id is indexed *before* an existing record is bound to it, and
   an id is un-indexed only once its record is dead: an id whose record is live
   may be relied on by a bind in flight (a rebind back to that user, say) whatever
   it is bound to now, and no script can check record and index together on
   Cluster. A rebind leaves a stale entry in the old user's index.
2. An index entry whose record is missing is dead for good: ids are never reused
   and a new id is indexed only once its record exists. So ``user_sessions`` and
   ``revoke_user`` may drop such entries. An entry whose record exists but is bound
   to someone else (or to nobody) is kept.
3. Our own operations leave no dead entry: every index add is noted in the record
   (``m:i:<user>``) -- with the write that creates or binds it, or, for a bind that
   lost its race (MOVED), in a script of its own -- or undone by the adder once the
   record is found dead. Every delete is a script that names the noted users, whose
   entries are then removed (safe: the record is dead).
4. A request writes only to the record it loaded, as it loaded it: every update
   (save, ``incr``) checks in its script that the record is still live and still
   bound to the same user (GONE/MOVED otherwise, and the request's changes are
   dropped, with no Set-Cookie).

``regenerate()`` (login, rotation) carries the old record's data into a new id:

a. create the new record (bound to the new user, if any; a successor names its
   predecessor in ``m:prev``), then index it -- a successor by INDEX_SUCCESSOR,
   which refuses while a revoke of the user is under way (then the new record is
   deleted, the old one left to the revoke, and the request gets no cookie);
b. then delete the old record only if it is still live and bound to the user the
   request loaded, then un-index it from every user it noted;
c. if (b) found it gone or rebound, delete the new record and un-index it: the
   session ended during the request, like a save finding it gone. (Rebound: the
   old id stays indexed, see 1.)

Ids of sessions that ended by TTL stay in the index until ``user_sessions`` or
``revoke_user`` meets them, or the index expires; our own deletes un-index at once.
A request that fails between (a) and (b) can leave a new record whose id was never
sent to anyone: harmless, and gone at its idle timeout.

Revocation markers (how ``revoke_user`` and ``revoke_session`` keep successors
from outliving them) are described in ``_index``; the key scheme and fields in
``_record``; the scripts in ``_scripts``.

Ordered steps: a single server runs one connection's commands in order, so the
steps of a save go in one pipeline; a step that depends on an earlier *reply* (b
after a successor's index add; un-index after a delete-if-live; c) is a round trip
of its own. On Cluster every step is its own round trip. Round trips after the
load, single server (Cluster): write, incr, touch 1 (1); first save 1 (1, or 2 when
bound); bind or rebind 1 (2); clear 1 (2); login as another user 2 (4); rotation of
a bound session 3 (4); plus 1 for a save that lost a race and undoes its index add
or its new record, or a delete whose record noted other users. ``revoke_user``: 3;
``revoke_session``: 4.

Near cache (``near_cache=``, see ``_near``): the load is no round trip when this
process holds the record (or knows it is missing), one otherwise; the writes
above are unchanged, and each drops the copies of the keys it wrote.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, cast

import orjson

from .._redis import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT,
    Backend,
    RedisLike,
    check_seconds,
)
from ..errors import BackendUnavailable
from ..near import ABSENT, NearCache, NearStats, pttl_left
from ..near._fit import near_for, near_option
from ._codec import is_utf8
from ._index import UserIndex, kill_reply
from ._near import LocalRecord, record_size
from ._record import DATA, NOTE, PREV, ROOT, Record, as_text, decode_record, handle_of
from ._scripts import (
    DELETE_IF_USER,
    GONE,
    INCR,
    INDEX_SUCCESSOR,
    LOAD,
    MOVED,
    NOTE_USER,
    SAVE,
    SAVED,
    script,
)
from ._stats import SessionStats

logger = logging.getLogger("asgi_redis_kit.sessions")


class SessionStore(UserIndex):
    """The Redis store behind :class:`SessionMiddleware`, usable on its own.

    Admin scripts use it with the same key scheme as the app::

        async with SessionStore("redis://localhost:6379/0") as store:
            await store.revoke_user("alice")

    Parameters:
        redis: a URL or a ready ``redis.asyncio.Redis`` / ``RedisCluster``. A client
            made from a URL is closed by :meth:`aclose`; a client passed in is not.
        key_prefix: prefix of every key; must match the middleware's.
        idle_timeout: seconds a session lives without activity (its Redis TTL).
        absolute_lifetime: seconds after creation when a session ends however active
            it is; ``None`` for no limit.
        timeout: deadline in seconds for every Redis call.
        max_connections: pool size of a client made from a URL.
        clock: seconds since the epoch; replace it in tests.
        near_cache: keep loaded records in process memory, kept exact by Redis
            (``asgi_redis_kit.near``), so that a request which only reads its
            session sends no command: ``True`` for the process-wide
            ``NearCache.shared()`` (one tracking connection per Redis node, shared
            with the response cache), or a ``NearCache`` of your own. Every write
            of the store drops the copies it wrote. ``memory://`` (fakeredis)
            cannot track keys: there the store runs without it.

    ``stats`` is the store's counters (:class:`SessionStats`: sessions loaded,
    created, saved, regenerated, cleared, revoked, refused with 503...);
    ``near_stats`` is the near cache's counters (``NearStats``: hits, misses,
    bypasses, stores, invalidations, flushes...; process-wide for that
    ``NearCache``), or ``None`` without one.
    """

    def __init__(
        self,
        redis: RedisLike | Backend = "redis://localhost:6379/0",
        *,
        key_prefix: str = "ark:s:",
        idle_timeout: float = 14 * 24 * 3600,
        absolute_lifetime: float | None = 30 * 24 * 3600,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        clock: Callable[[], float] = time.time,
        near_cache: bool | NearCache = False,
    ) -> None:
        near = near_option(near_cache)
        if not isinstance(key_prefix, str) or not is_utf8(key_prefix):
            raise TypeError(f"key_prefix must be a string of valid UTF-8, got {key_prefix!r}")
        if not idle_timeout >= 0.001:
            raise ValueError(
                f"idle_timeout must be a positive number of seconds, got {idle_timeout!r}"
            )
        if absolute_lifetime is not None and not absolute_lifetime >= 0.001:
            raise ValueError(
                "absolute_lifetime must be a positive number of seconds or None, "
                f"got {absolute_lifetime!r}"
            )
        check_seconds("idle_timeout", idle_timeout)
        if absolute_lifetime is not None:
            check_seconds("absolute_lifetime", absolute_lifetime)
        self.backend = (
            redis
            if isinstance(redis, Backend)
            else Backend(redis, timeout=timeout, max_connections=max_connections)
        )
        self.key_prefix = key_prefix
        self.idle_ms = int(idle_timeout * 1000)
        self.absolute_ms = None if absolute_lifetime is None else int(absolute_lifetime * 1000)
        self.clock = clock
        self.near = near_for(near, self.backend.client, logger)
        self.stats = SessionStats()

    @property
    def near_stats(self) -> NearStats | None:
        """The near cache's counters (shared by every user of that NearCache)."""
        return None if self.near is None else self.near.stats

    def __repr__(self) -> str:
        return f"<SessionStore prefix={self.key_prefix!r} {self.backend!r}>"

    async def __aenter__(self) -> SessionStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the Redis client if the store created it from a URL."""
        await self.backend.aclose()

    async def ping(self) -> bool:
        """Whether Redis answers within the deadline: for health endpoints, which
        should report "degraded" rather than fail when it does not."""
        try:
            async with self.backend.call("session_ping") as client:
                await client.ping()
        except BackendUnavailable:
            return False
        return True

    # -- one session --------------------------------------------------------------

    async def load(self, session_id: str) -> Record | None:
        """The session's record, or ``None`` when it is missing, expired or corrupt.

        One round trip, or none when the near cache holds the record (or knows
        it is missing); never writes, so loading cannot create a record.
        """
        key = self.session_key(session_id)
        view = self._near_view()
        if view is None:
            return self._decode(session_id, await self._one(*script(LOAD, key)))[0]
        loop = asyncio.get_running_loop()
        hit = view.get(key)
        if hit is not None:
            if hit.value is ABSENT:
                return None
            local = cast("LocalRecord", hit.value)
            if local.deadline is None:  # no TTL in Redis (not one we set)
                return self._decode(session_id, [-1, local.fields])[0]
            remaining = int((local.deadline - loop.time()) * 1000)
            if remaining > 0:
                return self._decode(session_id, [remaining, local.fields])[0]
            # Past its Redis deadline (the local cap runs a little later): ask Redis.
        ticket = view.begin([key])  # before the read is sent: see near._near
        try:
            sent = loop.time()
            reply = await self._one(*script(LOAD, key))
            record, ours = self._decode(session_id, reply)
            if not reply:
                view.put(ticket, key, ABSENT, -2, 0)
            elif ours:
                pttl = int(reply[0])
                fields = tuple(v.encode() if isinstance(v, str) else bytes(v) for v in reply[1])
                # The record's Redis deadline, for the PTTL a local hit reports.
                # put() counts the PTTL from begin() (before ``sent``) and refuses
                # a reply already past it, so the entry ends by that deadline too:
                # the response cache takes any entry under the key but ABSENT as
                # proof that the session lives.
                deadline = None if pttl < 0 else sent + pttl_left(pttl)
                view.put(ticket, key, LocalRecord(fields, deadline), pttl, record_size(fields))
            return record
        finally:
            view.end(ticket)

    def _decode(self, session_id: str, reply: Any) -> tuple[Record | None, bool]:
        """The record of a LOAD reply (``None``: missing, corrupt or past its
        absolute lifetime), and whether the reply is one of our records."""
        if not reply:
            return None, False
        try:
            if isinstance(reply, bytes | str):
                raise TypeError("the key is not a hash")  # the script's 'WRONGTYPE'
            record = decode_record(list(reply[1]), int(reply[0]))
        except (ValueError, IndexError, TypeError, orjson.JSONDecodeError, UnicodeDecodeError):
            # Someone wrote to our key, or a bug did: never a 500 or a 503, never
            # trusted. The key is left alone; a write gets a fresh id.
            logger.warning(
                "security: corrupt session record %s ignored; a new session is started",
                handle_of(session_id),
            )
            return None, False
        if self.ttl_ms(record.created_ms) <= 0:
            return None, True  # past its absolute lifetime; its TTL removes it any moment
        return record, True

    async def save(
        self,
        session_id: str,
        *,
        create: bool,
        fields: dict[str, bytes],
        deleted: Iterable[str] = (),
        ttl_ms: int,
        user: str | None = None,
        bind: str | None = None,
        drop: Iterable[tuple[str, str | None]] = (),
    ) -> int:
        """Write a session; returns SAVED, GONE, EMPTIED or MOVED.

        ``fields``/``deleted`` are raw hash fields. An update (``create=False``)
        writes only if the record is still live and bound to ``user``, the user
        it was loaded with. ``bind`` adds the session to a user's index (before an
        update commits, after a creation) and notes that user in the record. The
        user it leaves keeps a stale entry (see the module docstring). ``drop``
        lists records (id, bound user) to delete along with a creation: the ones
        ``clear()`` ended, whose data is not carried over (for ``regenerate()`` see
        :meth:`replace`).

        One round trip on a single server (two on Cluster), plus one when a bind
        lost a race.
        """
        key = self.session_key(session_id)
        fields = dict(fields)
        if bind is not None:
            fields[NOTE + bind] = b"1"
        args: list[Any] = ["1" if create else "0", user or "", ttl_ms, len(fields)]
        for field, value in fields.items():
            args += [field, value]
        args += list(deleted)
        save = script(SAVE, key, *args)
        if create:
            drop = list(drop)
            (created, *killed), _ = await self._steps(
                [save, *self._kill_commands(drop)],
                self._index_commands(bind, session_id) + self._unindex_commands(drop),
            )
            await self._unindex_noted(drop, killed)
            self.stats.created += 1
            return int(created)
        keep = self._keep_index(user, ttl_ms) if bind is None else []
        _, (result, *_) = await self._steps(self._index_commands(bind, session_id), [save, *keep])
        result = int(result)
        if result == SAVED:
            self.stats.saved += 1
        if bind is not None and result == MOVED:
            # Bound to someone else meanwhile, but live: our entry may be relied on
            # by a bind to ``bind`` in flight, so it stays, noted in the record for
            # the delete that ends it -- unless the record died meanwhile.
            noted = await self._one(*script(NOTE_USER, key, bind))
            if int(noted) == 0:
                await self._one("SREM", self.user_key(bind), session_id)
        elif bind is not None and result == GONE:
            await self._one("SREM", self.user_key(bind), session_id)  # dead: safe
        return result

    async def replace(
        self,
        old: tuple[str, str | None],
        session_id: str,
        *,
        fields: dict[str, bytes],
        ttl_ms: int,
        user: str | None,
        lineage: str = "",
    ) -> bool:
        """Store a new session that continues ``old`` (id, bound user; ``lineage``:
        its ``m:root``, if any) and delete ``old`` -- ``regenerate()``, or ``clear()``
        then ``bind_user()`` of the same user. False, and nothing stored, when
        ``old`` ended meanwhile (revoked, logged out, expired or rebound), or when
        it stays bound to ``user`` and a revoke of ``user`` is under way: the new
        session must not outlive it. See the module docstring for why this order.

        Two round trips on a single server (three when ``old`` stays bound to the
        same user, more when ``old`` was gone), up to four on Cluster.
        """
        old_id, old_user = old
        fields = dict(fields)
        # A successor: it stays bound to the same user (see the module docstring).
        successor = old_user if user == old_user else None
        if user is not None:
            fields[NOTE + user] = b"1"
        if successor is not None:
            fields[PREV] = handle_of(old_id).encode()
            fields[ROOT] = (lineage or handle_of(old_id)).encode()
        create = script(SAVE, self.session_key(session_id), "1", "", ttl_ms, len(fields))
        create += tuple(item for pair in fields.items() for item in pair)
        kill = script(DELETE_IF_USER, self.session_key(old_id), old_user or "")
        if successor is not None:
            index = self.user_key(successor)
            add = script(INDEX_SUCCESSOR, index, self._index_ttl(), session_id)
            _, (indexed,) = await self._steps([create], [add])
            if int(indexed) == 0:  # a revoke of the user is under way: it ends old
                await self.delete([(session_id, user)])
                return False
            (killed,) = await self._batch(kill)
        else:
            _, _, (killed,) = await self._steps(
                [create], self._index_commands(user, session_id), [kill]
            )
        code, noted = kill_reply(killed)
        if code == 1:
            if noted:  # an anonymous session was in no index
                await self._batch(*self._srem_commands(old_id, noted))
            self.stats.regenerated += 1
            return True
        # old is gone (dead for good: un-index it) or live and bound to someone else
        # (an entry a bind in flight may rely on: keep it). Drop the new record.
        if code == 0 and old_user is not None:
            await self._one("SREM", self.user_key(old_user), old_id)
        await self.delete([(session_id, user)])
        return False

    async def touch(self, session_id: str, ttl_ms: int, *, user: str | None = None) -> bool:
        """Refresh the idle TTL (and the index of ``user``, the bound user, so that
        it outlives the session); False if the session no longer exists."""
        key = self.session_key(session_id)
        refreshed, *_ = await self._batch(("PEXPIRE", key, ttl_ms), *self._keep_index(user, ttl_ms))
        if refreshed:
            self.stats.touched += 1
        return bool(refreshed)

    async def incr(
        self, session_id: str, key: str, amount: int, *, user: str | None = None
    ) -> int | None:
        """Atomically add ``amount`` to ``session[key]``; ``None`` if the session is
        gone or no longer bound to ``user`` (the user it was loaded with)."""
        command = script(INCR, self.session_key(session_id), DATA + key, amount, user or "")
        result = await self._one(*command)
        if isinstance(result, bytes | str):
            raise TypeError(
                f"session[{key!r}] does not hold an integer, or adding {amount!r} to it "
                f"would pass the 64-bit limit (Redis said: {as_text(result)})"
            )
        return None if result is None else int(result)
