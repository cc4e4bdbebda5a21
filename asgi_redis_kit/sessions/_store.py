"""The Redis side of sessions: key scheme, Lua scripts and the per-user index.

Keys (``key_prefix`` defaults to ``ark:s:``)::

    {prefix}{session_id}        hash, one per session
    {prefix}u:{{{user_id}}}     set of the ids of the sessions bound to a user

Fields of a session hash::

    d:<key>      ``session[key]`` as ``_codec`` encodes it (orjson for plain JSON values;
                 the prefix means no key can clash with metadata)
    m:created    creation time, integer milliseconds since the epoch
    m:user       the bound user id, when there is one
    m:i:<user>   a note: the id may be in that user's index (set before or with
                 every index add that the record outlives)
    m:prev       the handle of the session this one continues (see "successor")
    m:root       the handle of the first session of that line (a session without
                 it is the first of its own)

Every script touches exactly one key and no command ever spans two sessions, so
the scheme works unchanged on Redis Cluster; nothing here uses KEYS or SCAN.

Why scripts: saving an existing session must write only the fields this request
changed, and must do nothing at all if the session was cleared, revoked or expired
in the meantime -- a plain HSET would bring a logged-out session back to life when a
slow request finishes after the logout. The save script checks and writes in one
atomic step. Scripts run by EVALSHA; after a Redis restart empties the script
cache, the NOSCRIPT reply makes us load them and send again the commands it refused.

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
   predecessor in ``m:prev``), then index it -- a successor by _INDEX_SUCCESSOR,
   which refuses while a revoke of the user is under way (then the new record is
   deleted, the old one left to the revoke, and the request gets no cookie);
b. then delete the old record only if it is still live and bound to the user the
   request loaded, then un-index it from every user it noted;
c. if (b) found it gone or rebound, delete the new record and un-index it: the
   session ended during the request, like a save finding it gone. (Rebound: the
   old id stays indexed, see 1.)

Revocation markers. ``revoke_user`` takes the index atomically (SMEMBERS + DEL) and
leaves in it a marker (a member ``!r:<deadline>:<token>``; no session id starts with
"!"), deletes every listed record still bound to the user, puts back the entries of
live records bound to someone else (2), and removes the marker. A successor indexed
before the take is in what it took; one indexed after is refused; a login that runs
(b) after the revoke's delete sees the old record gone and drops its new one (c).
So one pass ends every session that continues a revoked one. ``revoke_session``
marks the index the same way (without taking it), reads every listed record's
``m:prev`` and ``m:root``, and deletes the session and every session of its line
(successors form one line: each deletes the one it continues). It finds the line
from the handle of its first session, of a live one, or of the one a live session
directly continues -- not from a handle that was rotated twice or more before the
call (only the newest handles are listed, so callers rarely hold one). The
marker lives in the index key itself -- the one key sure to share its slot, whatever
the user id -- and has a deadline (server time) so that a revoke that dies half-way
blocks rotations for ``REVOKE_GRACE_MS`` at most. While a revoke runs, a rotation
of the user's other sessions is refused too: it keeps its old id.

Ids of sessions that ended by TTL stay in the index until ``user_sessions`` or
``revoke_user`` meets them, or the index expires; our own deletes un-index at once.
A request that fails between (a) and (b) can leave a new record whose id was never
sent to anyone: harmless, and gone at its idle timeout.

Ordered steps: a single server runs one connection's commands in order, so the
steps of a save go in one pipeline; a step that depends on an earlier *reply* (b
after a successor's index add; un-index after a delete-if-live; c) is a round trip
of its own. On Cluster every step is its own round trip. Round trips after the
load, single server (Cluster): write, incr, touch 1 (1); first save 1 (1, or 2 when
bound); bind or rebind 1 (2); clear 1 (2); login as another user 2 (4); rotation of
a bound session 3 (4); plus 1 for a save that lost a race and undoes its index add
or its new record, or a delete whose record noted other users. ``revoke_user``: 3;
``revoke_session``: 4.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from .._redis import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT,
    Backend,
    RedisClient,
    RedisLike,
    check_seconds,
)
from ..errors import BackendUnavailable
from ._codec import decode, is_utf8

logger = logging.getLogger("asgi_redis_kit.sessions")

DATA = "d:"
CREATED = "m:created"
USER = "m:user"
NOTE = "m:i:"  # m:i:<user>: the record may be listed in that user's index
PREV = "m:prev"  # handle of the record this one continues (regenerate, same user)
ROOT = "m:root"  # handle of the first record of that line of successors

SAVED, GONE, EMPTIED, MOVED = 1, 0, 2, 3

# How long a revoke's marker in the index refuses successors at most: a revoke that
# dies half-way must not block rotations for long; one that runs takes far less.
REVOKE_GRACE_MS = 60_000
# A marker is the index member "!r:<deadline, server ms>:<token>"; no session id
# starts with "!" (they are url-safe base64).
MARKER = "!"


class _Script:
    # Lua's unpack() refuses more than ~8000 values ("too many results to
    # unpack"), so the scripts pass fields and ids to Redis in slices of 1000
    # (an even number: HSET takes field/value pairs).
    def __init__(self, text: str) -> None:
        # Every script may call bound_user(); Redis compiles it once per script.
        self.text = _BOUND_USER + text
        self.sha = hashlib.sha1(self.text.encode(), usedforsecurity=False).hexdigest()


# The user bound to the live session record KEYS[1] ('' when it has none), or false
# when there is no such record: the key is missing, or holds something that is not
# one of our records (not a hash, or no creation time). Never an error reply.
_BOUND_USER = """
local function bound_user()
  if redis.call('TYPE', KEYS[1]).ok ~= 'hash'
      or redis.call('HEXISTS', KEYS[1], 'm:created') == 0 then
    return false
  end
  return redis.call('HGET', KEYS[1], 'm:user') or ''
end
"""

# ARGV: mode ('1' create: the key must not exist; '0' update: the key must be a live
# record still bound to the user ARGV[2], '' for none), TTL ms, n, then n field/value
# pairs, then fields to delete. Returns SAVED, GONE, EMPTIED or MOVED (bound to
# another user now: rebound or logged in by another request).
_SAVE = _Script("""
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
else
  local user = bound_user()
  if user == false then
    return 0
  elseif user ~= ARGV[2] then
    return 3
  end
end
local last = 4 + 2 * tonumber(ARGV[4])
if last > 4 then
  for i = 5, last, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, last)))
  end
end
if last < #ARGV then
  for i = last + 1, #ARGV, 1000 do
    redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  -- An empty session is never stored: delete it once no data and no user is left.
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 2) == 'd:' or field == 'm:user' then
      redis.call('PEXPIRE', KEYS[1], ARGV[3])
      return 1
    end
  end
  redis.call('DEL', KEYS[1])
  return 2
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""")

# The whole record and its TTL in one command (nil when there is no record). A key
# that is not a hash (someone SET it) answers the string 'WRONGTYPE': a corrupt
# record, not an outage; any other error reply stays an error (a 503).
_LOAD = _Script("""
local fields = redis.pcall('HGETALL', KEYS[1])
if fields.err then
  if string.sub(tostring(fields.err), 1, 9) == 'WRONGTYPE' then
    return 'WRONGTYPE'
  end
  return fields
end
if #fields == 0 then
  return false
end
return {redis.call('PTTL', KEYS[1]), fields}
""")

# Counter on a live record still bound to the user ARGV[3] ('' for none); nil
# otherwise. Only the caller's own mistakes come back as a string (the value is not
# an integer, or the sum overflows 64 bits): every other error reply (OOM,
# READONLY, ...) is an outage and stays an error reply, so it becomes a 503.
_INCR = _Script("""
if bound_user() ~= ARGV[3] then
  return false
end
local result = redis.pcall('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if type(result) == 'table' and result.err then
  local text = tostring(result.err)
  if text == 'ERR hash value is not an integer'
      or text == 'ERR increment or decrement would overflow'
      or text == 'ERR value is not an integer or out of range' then
    return text
  end
  return result
end
return result
""")

# The end of every script that adds to an index (KEYS[1]): it lives as long as
# the longest session it can hold (ARGV[1] ms; 0: no TTL).
_KEEP_INDEX = """
local ttl = tonumber(ARGV[1])
if ttl == 0 then
  redis.call('PERSIST', KEYS[1])
elseif redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

# Add ids ARGV[2..] to the index; it lives as long as the longest session it can
# hold (ARGV[1]; 0: no TTL).
_INDEX_ADD = _Script(
    """
for i = 2, #ARGV, 1000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
"""
    + _KEEP_INDEX
)

# The users whose index may list KEYS[1] (its notes and its bound user), for the
# un-index that follows its delete: only then is an SREM of it always safe.
_NOTED = """
local function noted_users()
  local users = {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 4) == 'm:i:' then
      users[#users + 1] = string.sub(field, 5)
    end
  end
  users[#users + 1] = redis.call('HGET', KEYS[1], 'm:user') or nil
  return users
end
"""

# Make the index live at least ARGV[1] ms more; one without a TTL keeps none.
_INDEX_TTL = _Script("""
local pttl = redis.call('PTTL', KEYS[1])
if pttl >= 0 and pttl < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
""")

# Delete the session only if it is still a live record bound to ARGV[1] ('' for
# none). {1, noted users...}: deleted; 0: no live record; 2: live but bound to
# someone else.
_DELETE_IF_USER = _Script(
    _NOTED
    + """
local user = bound_user()
if user == false then
  return 0
elseif user == ARGV[1] then
  local users = noted_users()
  redis.call('DEL', KEYS[1])
  table.insert(users, 1, 1)
  return users
end
return 2
"""
)

# Delete the key whatever it holds; the noted users of the record it was.
_KILL = _Script(
    _NOTED
    + """
if bound_user() == false then
  redis.call('DEL', KEYS[1])
  return {}
end
local users = noted_users()
redis.call('DEL', KEYS[1])
return users
"""
)

# Note the user ARGV[1] on a live record (a bind that lost its race left an index
# entry there); 0 when the record is dead, and the entry can go.
_NOTE_USER = _Script("""
if bound_user() == false then
  return 0
end
redis.call('HSET', KEYS[1], 'm:i:' .. ARGV[1], '1')
return 1
""")

# {bound user ('' for none), m:prev, m:root ('' for none)}, or nil when there is
# no live record: the links revoke_session follows.
_LINK = _Script("""
local user = bound_user()
if user == false then
  return false
end
return {user, redis.call('HGET', KEYS[1], 'm:prev') or '',
        redis.call('HGET', KEYS[1], 'm:root') or ''}
""")

# One entry of user_sessions(): nil when there is no live record.
_INFO = _Script("""
local user = bound_user()
if user == false then
  return false
end
return {redis.call('HGET', KEYS[1], 'm:created'), user, redis.call('PTTL', KEYS[1])}
""")

# Revocation markers live in the index itself (the one key certain to share its
# slot, whatever the user id). A live marker makes _INDEX_SUCCESSOR refuse.
_MARKERS = """
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local function marker_live(member, now)
  local deadline = tonumber(string.match(member, '^!r:(%d+):'))
  return deadline ~= nil and deadline > now
end
"""

# ARGV: grace ms, token. Take the whole index atomically (so a login racing a revoke
# stays indexed) and leave in its place a marker (returned first) that refuses every
# successor of a taken session until revoke_user removes it. Other revokes' live
# markers stay.
_TAKE_INDEX = _Script(
    _MARKERS
    + """
local now = now_ms()
local marker = '!r:' .. (now + tonumber(ARGV[1])) .. ':' .. ARGV[2]
local pttl = redis.call('PTTL', KEYS[1])
local members = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
local taken = {marker}
for _, member in ipairs(members) do
  if string.sub(member, 1, 1) ~= '!' then
    taken[#taken + 1] = member
  elseif marker_live(member, now) then
    redis.call('SADD', KEYS[1], member)
  end
end
redis.call('SADD', KEYS[1], marker)
-- The index keeps its TTL (no TTL: none), so entries put back outlive their sessions.
if pttl ~= -1 then
  redis.call('PEXPIRE', KEYS[1], math.max(pttl, tonumber(ARGV[1])))
end
return taken
"""
)

# ARGV: grace ms, token. The index (marker first), with a marker added, for
# revoke_session; nil, and no marker, when the index is empty.
_MARK_INDEX = _Script(
    _MARKERS
    + """
local members = redis.call('SMEMBERS', KEYS[1])
if #members == 0 then
  return false
end
local marker = '!r:' .. (now_ms() + tonumber(ARGV[1])) .. ':' .. ARGV[2]
redis.call('SADD', KEYS[1], marker)
table.insert(members, 1, marker)
return members
"""
)

# Index ARGV[2], a successor (a record continuing a session bound to this user),
# unless a revoke of the user is under way: 0, refused. TTL as _INDEX_ADD.
_INDEX_SUCCESSOR = _Script(
    _MARKERS
    + """
local now = now_ms()
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if string.sub(member, 1, 1) == '!' then
    if marker_live(member, now) then
      return 0
    end
    redis.call('SREM', KEYS[1], member)
  end
end
redis.call('SADD', KEYS[1], ARGV[2])
"""
    + _KEEP_INDEX
)

_SCRIPTS = (
    _LOAD,
    _SAVE,
    _INCR,
    _INDEX_ADD,
    _INDEX_TTL,
    _DELETE_IF_USER,
    _KILL,
    _NOTE_USER,
    _LINK,
    _INFO,
    _TAKE_INDEX,
    _MARK_INDEX,
    _INDEX_SUCCESSOR,
)


def handle_of(session_id: str) -> str:
    """A non-secret name for a session: safe to show, log and use in admin UIs."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class SessionInfo:
    """One of a user's sessions, as listed by :meth:`SessionStore.user_sessions`.

    Attributes:
        handle: a hash of the session id; identifies the session without being
            able to use it (compare with ``request.session.handle``).
        created_at: creation time, seconds since the epoch.
        expires_at: when the session ends if unused, seconds since the epoch.
    """

    handle: str
    created_at: float
    expires_at: float


@dataclass(frozen=True)
class Record:
    """A session as loaded from Redis."""

    data: dict[str, Any]
    encoded: dict[str, bytes]
    created_ms: int
    user_id: str | None
    pttl_ms: int
    lineage: str = ""  # m:root: the handle of the first record of its line, if not itself


Command = tuple[Any, ...]  # ("HGETALL", key): redis-py parses each reply by its name


def _script(script: _Script, key: str, *args: Any) -> Command:
    return ("EVALSHA", script.sha, 1, key, *args)


class SessionStore:
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
    ) -> None:
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
            async with self.backend.call() as client:
                await client.ping()
        except BackendUnavailable:
            return False
        return True

    # -- keys and time ------------------------------------------------------------

    def session_key(self, session_id: str) -> str:
        return f"{self.key_prefix}{session_id}"

    def user_key(self, user_id: str) -> str:
        # Hash tag: the index is always one slot whatever the user id looks like.
        return f"{self.key_prefix}u:{{{user_id}}}"

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def ttl_ms(self, created_ms: int) -> int:
        """The TTL a session created at ``created_ms`` should get now (<= 0: over)."""
        if self.absolute_ms is None:
            return self.idle_ms
        return min(self.idle_ms, created_ms + self.absolute_ms - self.now_ms())

    def cookie_max_age(self, created_ms: int) -> int:
        """Seconds the browser should keep the cookie: as long as the session could
        live. With an absolute lifetime that is fixed at creation, so TTL refreshes
        need no new cookie; without one it is the idle timeout from now."""
        if self.absolute_ms is None:
            remaining = self.idle_ms
        else:
            remaining = created_ms + self.absolute_ms - self.now_ms()
        return max(1, -(-remaining // 1000))

    def touch_due(self, record_pttl: int, created_ms: int) -> bool:
        """Refresh the idle TTL at most once per tenth of the idle timeout -- or at
        once when the record's TTL is longer than the settings allow now: one
        stored under a longer ``idle_timeout`` gets the new one on its next request.
        (The same tenth of slack both ways: app servers' clocks differ a little.)"""
        allowed = self.ttl_ms(created_ms)
        slack = self.idle_ms // 10
        return record_pttl < allowed - slack or record_pttl > allowed + slack

    # -- batches ------------------------------------------------------------------

    async def _batch(self, *commands: Command) -> list[Any]:
        """Run ``commands`` in one round trip (on Cluster: one per node involved).

        On NOSCRIPT (a restarted or flushed Redis) load the scripts and send again
        the commands refused with it, which did not run; the others ran once.
        """
        async with self.backend.call() as client:
            results = await self._send(client, commands)
            refused = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if refused:
                for script in _SCRIPTS:
                    await client.script_load(script.text)
                again = await self._send(client, tuple(commands[i] for i in refused))
                for i, result in zip(refused, again, strict=True):
                    results[i] = result
            for result in results:
                if isinstance(result, Exception):
                    raise result  # inside call(): OOM, READONLY, BUSY... become a 503
        return results

    async def _steps(self, *steps: list[Command]) -> list[list[Any]]:
        """Run ``steps`` so that each takes effect before the next one starts.

        A single server runs one connection's commands in order, so all the steps
        go in one round trip. On Cluster the steps' keys live on different nodes,
        which run what they get in any order: each step is its own round trip,
        sent once the previous one has succeeded.
        """
        if not isinstance(self.backend.client, RedisCluster):
            flat = [command for step in steps for command in step]
            results = await self._batch(*flat) if flat else []
            split: list[list[Any]] = []
            for step in steps:
                split.append(results[: len(step)])
                results = results[len(step) :]
            return split
        return [await self._batch(*step) if step else [] for step in steps]

    async def _one(self, *command: Any) -> Any:
        (result,) = await self._batch(command)
        return result

    @staticmethod
    async def _send(client: RedisClient, commands: tuple[Command, ...]) -> list[Any]:
        if len(commands) == 1:
            # No pipeline for one command: redis-py's pipeline costs extra tasks and
            # event-loop turns per request (it shields the connection's release).
            try:
                return [await client.execute_command(*commands[0])]
            except ResponseError as exc:
                return [exc]
        # On RedisCluster a ClusterPipeline sends each node its commands in one
        # round trip. redis-py refuses pipe.evalsha() there, but routes an
        # EVALSHA given to execute_command by its key like any other command.
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    # -- one session --------------------------------------------------------------

    async def load(self, session_id: str) -> Record | None:
        """The session's record, or ``None`` when it is missing, expired or corrupt.

        One round trip; never writes, so loading cannot create a record.
        """
        reply = await self._one(*_script(_LOAD, self.session_key(session_id)))
        if not reply:
            return None
        try:
            if isinstance(reply, bytes | str):
                raise TypeError("the key is not a hash")  # the script's 'WRONGTYPE'
            record = self._decode(reply[1], int(reply[0]))
        except (ValueError, IndexError, TypeError, orjson.JSONDecodeError, UnicodeDecodeError):
            # Someone wrote to our key, or a bug did: never a 500 or a 503, never
            # trusted. The key is left alone; a write gets a fresh id.
            logger.warning(
                "security: corrupt session record %s ignored; a new session is started",
                handle_of(session_id),
            )
            return None
        if self.ttl_ms(record.created_ms) <= 0:
            return None  # past its absolute lifetime; its TTL removes it any moment
        return record

    @staticmethod
    def _decode(raw: list[Any], pttl: int) -> Record:
        data: dict[str, Any] = {}
        encoded: dict[str, bytes] = {}
        created_ms: int | None = None
        user_id: str | None = None
        lineage = ""
        pairs = iter(raw)
        for name, value in zip(pairs, pairs, strict=True):
            field = _text(name)
            blob = value.encode() if isinstance(value, str) else value
            if field.startswith(DATA):
                data[field[2:]] = decode(blob)
                encoded[field[2:]] = blob
            elif field == CREATED:
                created_ms = int(blob)
            elif field == USER:
                user_id = blob.decode()
            elif field == ROOT:
                lineage = blob.decode()
        if created_ms is None:
            raise ValueError("no creation time")
        return Record(data, encoded, created_ms, user_id, pttl, lineage)

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
        save = _script(_SAVE, key, *args)
        if create:
            drop = list(drop)
            (created, *killed), _ = await self._steps(
                [save, *self._kill_commands(drop)],
                self._index_commands(bind, session_id) + self._unindex_commands(drop),
            )
            await self._unindex_noted(drop, killed)
            return int(created)
        keep = self._keep_index(user, ttl_ms) if bind is None else []
        _, (result, *_) = await self._steps(self._index_commands(bind, session_id), [save, *keep])
        result = int(result)
        if bind is not None and result == MOVED:
            # Bound to someone else meanwhile, but live: our entry may be relied on
            # by a bind to ``bind`` in flight, so it stays, noted in the record for
            # the delete that ends it -- unless the record died meanwhile.
            noted = await self._one(*_script(_NOTE_USER, key, bind))
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
        create = _script(_SAVE, self.session_key(session_id), "1", "", ttl_ms, len(fields))
        create += tuple(item for pair in fields.items() for item in pair)
        kill = _script(_DELETE_IF_USER, self.session_key(old_id), old_user or "")
        if successor is not None:
            index = self.user_key(successor)
            add = _script(_INDEX_SUCCESSOR, index, self._index_ttl(), session_id)
            _, (indexed,) = await self._steps([create], [add])
            if int(indexed) == 0:  # a revoke of the user is under way: it ends old
                await self.delete([(session_id, user)])
                return False
            (killed,) = await self._batch(kill)
        else:
            _, _, (killed,) = await self._steps(
                [create], self._index_commands(user, session_id), [kill]
            )
        code, noted = _kill_reply(killed)
        if code == 1:
            if noted:  # an anonymous session was in no index
                await self._batch(*self._srem_commands(old_id, noted))
            return True
        # old is gone (dead for good: un-index it) or live and bound to someone else
        # (an entry a bind in flight may rely on: keep it). Drop the new record.
        if code == 0 and old_user is not None:
            await self._one("SREM", self.user_key(old_user), old_id)
        await self.delete([(session_id, user)])
        return False

    def _kill_commands(self, drop: Iterable[tuple[str, str | None]]) -> list[Command]:
        return [_script(_KILL, self.session_key(old_id)) for old_id, _ in drop]

    def _unindex_commands(self, drop: Iterable[tuple[str, str | None]]) -> list[Command]:
        # Only ever sent after the record's delete: a dead id may always go.
        return [("SREM", self.user_key(user), old_id) for old_id, user in drop if user is not None]

    def _srem_commands(self, session_id: str, users: Iterable[str]) -> list[Command]:
        return [("SREM", self.user_key(user), session_id) for user in dict.fromkeys(users)]

    async def _unindex_noted(self, drop: list[tuple[str, str | None]], killed: list[Any]) -> None:
        """After deleting ``drop``, un-index them from the other users their records
        noted (a rebind, or a bind that lost a race): rare, one round trip more."""
        extra: list[Command] = []
        for (old_id, user), noted in zip(drop, killed, strict=True):
            others = (_text(name) for name in noted)
            extra += self._srem_commands(old_id, (name for name in others if name != user))
        if extra:
            await self._batch(*extra)

    def _index_commands(self, user: str | None, *session_ids: str) -> list[Command]:
        if user is None or not session_ids:
            return []
        return [_script(_INDEX_ADD, self.user_key(user), self._index_ttl(), *session_ids)]

    async def delete(self, drop: Iterable[tuple[str, str | None]]) -> None:
        """Delete sessions (id, user it was loaded with), then un-index them from
        every user their records noted: one round trip on a single server, two on
        Cluster (one more when a record was noted for other users)."""
        drop = list(drop)
        if drop:
            killed, _ = await self._steps(self._kill_commands(drop), self._unindex_commands(drop))
            await self._unindex_noted(drop, killed)

    async def touch(self, session_id: str, ttl_ms: int, *, user: str | None = None) -> bool:
        """Refresh the idle TTL (and the index of ``user``, the bound user, so that
        it outlives the session); False if the session no longer exists."""
        key = self.session_key(session_id)
        refreshed, *_ = await self._batch(("PEXPIRE", key, ttl_ms), *self._keep_index(user, ttl_ms))
        return bool(refreshed)

    def _keep_index(self, user: str | None, ttl_ms: int) -> list[Command]:
        # Every TTL refresh of a bound session makes its index live at least as
        # long: the index's own TTL was set when an id was added, maybe by a store
        # with a shorter absolute lifetime than the one refreshing now.
        if user is None:
            return []
        return [_script(_INDEX_TTL, self.user_key(user), ttl_ms)]

    async def incr(
        self, session_id: str, key: str, amount: int, *, user: str | None = None
    ) -> int | None:
        """Atomically add ``amount`` to ``session[key]``; ``None`` if the session is
        gone or no longer bound to ``user`` (the user it was loaded with)."""
        command = _script(_INCR, self.session_key(session_id), DATA + key, amount, user or "")
        result = await self._one(*command)
        if isinstance(result, bytes | str):
            raise TypeError(
                f"session[{key!r}] does not hold an integer, or adding {amount!r} to it "
                f"would pass the 64-bit limit (Redis said: {_text(result)})"
            )
        return None if result is None else int(result)

    # -- per-user index -----------------------------------------------------------

    def _index_ttl(self) -> int:
        # A session bound now cannot outlive its absolute lifetime; with no absolute
        # lifetime sessions can live forever, and so does the index.
        return 0 if self.absolute_ms is None else self.absolute_ms

    async def user_sessions(self, user_id: str) -> list[SessionInfo]:
        """The live sessions bound to ``user_id``, oldest first.

        Entries of sessions that no longer exist are pruned on the way. An entry of
        a session bound to someone else (or to nobody) is skipped but kept: a
        request may be binding it to ``user_id`` right now.
        """
        check_user(user_id)
        index = self.user_key(user_id)
        members = await self._one("SMEMBERS", index)
        ids = sorted(_session_ids(members))
        if not ids:
            return []
        replies = await self._batch(
            *(_script(_INFO, self.session_key(session_id)) for session_id in ids)
        )
        now = self.clock()
        infos: list[SessionInfo] = []
        dead: list[str] = []
        for session_id, reply in zip(ids, replies, strict=True):
            if not reply:
                dead.append(session_id)
                continue
            created, bound, pttl = reply
            if _text(bound) != user_id:
                continue
            try:
                created_ms = int(created)
            except ValueError:  # not one of our records; load() ignores it too
                dead.append(session_id)
                continue
            if self.ttl_ms(created_ms) <= 0:
                continue  # past its absolute lifetime: gone any moment
            expires_at = now + pttl / 1000 if pttl >= 0 else float("inf")
            infos.append(SessionInfo(handle_of(session_id), created_ms / 1000, expires_at))
        if dead:
            try:
                await self._one("SREM", index, *dead)
            except BackendUnavailable as exc:
                # Pruning is housekeeping; the listing is what was asked, and it is
                # complete. (A read-only replica, a failover: the next call prunes.)
                logger.info("user_sessions could not prune dead index entries: %s", exc)
        infos.sort(key=lambda info: info.created_at)
        return infos

    async def revoke_user(self, user_id: str) -> int:
        """Delete every session bound to ``user_id`` ("log out everywhere").

        Returns how many sessions were deleted. Sessions of other users are never
        touched, even if the index is stale. Three round trips (see the module
        docstring): take the index leaving a marker, delete, remove the marker.
        """
        check_user(user_id)
        index = self.user_key(user_id)
        take = _script(_TAKE_INDEX, index, REVOKE_GRACE_MS, secrets.token_hex(8))
        marker, *members = await self._one(*take)
        ids = _session_ids(members)
        deleted, keep, after = await self._delete_bound(user_id, ids)
        # Entries of records bound elsewhere go back (maybe a bind to user_id in
        # flight), then the marker goes: the same key, so in order even on Cluster.
        await self._batch(*self._index_commands(user_id, *keep), ("SREM", index, marker), *after)
        return deleted

    async def _delete_bound(
        self, user_id: str, ids: list[str]
    ) -> tuple[int, list[str], list[Command]]:
        """Delete the records of ``ids`` still bound to ``user_id``: (how many, the
        ids live and bound elsewhere, the un-index of the deleted and dead ones)."""
        if not ids:
            return 0, [], []
        replies = await self._batch(
            *(_script(_DELETE_IF_USER, self.session_key(sid), user_id) for sid in ids)
        )
        deleted, keep, after = 0, [], []
        for session_id, reply in zip(ids, replies, strict=True):
            code, noted = _kill_reply(reply)
            if code == 1:
                deleted += 1
                after += self._srem_commands(session_id, [user_id, *noted])
            elif code == 2:
                keep.append(session_id)  # maybe being bound to user_id right now
            else:
                after.append(("SREM", self.user_key(user_id), session_id))  # dead
        return deleted, keep, after

    async def revoke_session(self, user_id: str, handle: str) -> bool:
        """Delete the one session of ``user_id`` whose handle is ``handle``, and any
        session continuing it (a rotation that raced this call). Four round trips:
        mark the index, read the links, delete, remove the marker."""
        check_user(user_id)
        index = self.user_key(user_id)
        marked = await self._one(
            *_script(_MARK_INDEX, index, REVOKE_GRACE_MS, secrets.token_hex(8))
        )
        if not marked:
            return False
        marker, *members = marked
        ids = _session_ids(members)
        links = await self._batch(*(_script(_LINK, self.session_key(sid)) for sid in ids))
        # Successors form one line (each deletes the one it continues), named by its
        # first session's handle. The lines to end: the one ``handle`` is the first
        # of, the line of a session whose handle or predecessor it is. A successor
        # indexed after the marker is refused, so this snapshot holds them all.
        handles = {sid: handle_of(sid) for sid in ids}
        lines = {sid: handles[sid] for sid in ids}
        ended = {handle}
        for sid, link in zip(ids, links, strict=True):
            if link:
                prev, root = _text(link[1]), _text(link[2])
                lines[sid] = root or handles[sid]
                if handle in (handles[sid], prev):
                    ended.add(lines[sid])
        chain = [sid for sid in ids if lines[sid] in ended or handles[sid] == handle]
        deleted, _, after = await self._delete_bound(user_id, chain)
        await self._batch(("SREM", index, marker), *after)
        return deleted > 0


def _kill_reply(reply: Any) -> tuple[int, list[str]]:
    """(code, noted users) from _DELETE_IF_USER: 1 and the users when it deleted."""
    if isinstance(reply, list):
        return int(reply[0]), [_text(user) for user in reply[1:]]
    return int(reply), []


def _session_ids(members: Iterable[bytes | str]) -> list[str]:
    """The session ids of an index, without its revocation markers."""
    return [text for text in map(_text, members) if not text.startswith(MARKER)]


def check_user(user_id: object) -> None:
    """TypeError unless ``user_id`` can name a user: a non-empty str that Redis can
    store (valid UTF-8: no lone surrogates such as ``"\\ud800"``)."""
    # '' would match the sessions bound to nobody in the scripts.
    if not isinstance(user_id, str) or not user_id or not is_utf8(user_id):
        raise TypeError(f"user_id must be a non-empty string of valid UTF-8, got {user_id!r}")
