"""The Redis side of sessions: key scheme, Lua scripts and the per-user index.

Keys (``key_prefix`` defaults to ``ark:s:``)::

    {prefix}{session_id}        hash, one per session
    {prefix}u:{{{user_id}}}     set of the ids of the sessions bound to a user

Fields of a session hash::

    d:<key>      ``session[key]`` as ``_codec`` encodes it (orjson for plain JSON values;
                 the prefix means no key can clash with metadata)
    m:created    creation time, integer milliseconds since the epoch
    m:user       the bound user id, when there is one

Every script touches exactly one key and no command ever spans two sessions, so
the scheme works unchanged on Redis Cluster; nothing here uses KEYS or SCAN.

Why scripts: saving an existing session must write only the fields this request
changed, and must do nothing at all if the session was cleared, revoked or expired
in the meantime -- a plain HSET would bring a logged-out session back to life when a
slow request finishes after the logout. The save script checks and writes in one
atomic step. Scripts run by EVALSHA; after a Redis restart empties the script
cache, the NOSCRIPT reply makes us load them and repeat the (idempotent) batch.

Idle timeout is the key's TTL. The absolute lifetime is enforced from ``m:created``
on load and by never setting a TTL that reaches past it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from redis.exceptions import NoScriptError, ResponseError

from .._redis import DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT, Backend, RedisClient, RedisLike
from ..errors import BackendUnavailable
from ._codec import decode

logger = logging.getLogger("asgi_redis_kit.sessions")

DATA = "d:"
CREATED = "m:created"
USER = "m:user"

SAVED, GONE, EMPTIED = 1, 0, 2


class _Script:
    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


# ARGV: mode ('1' create: key must not exist; '0' update: key must exist), TTL ms,
# n, then n field/value pairs, then fields to delete.
_SAVE = _Script("""
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists == (ARGV[1] == '1') then
  return 0
end
local last = 3 + 2 * tonumber(ARGV[3])
if last > 3 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4, last))
end
if last < #ARGV then
  redis.call('HDEL', KEYS[1], unpack(ARGV, last + 1))
  -- An empty session is never stored: delete it once no data and no user is left.
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 2) == 'd:' or field == 'm:user' then
      redis.call('PEXPIRE', KEYS[1], ARGV[2])
      return 1
    end
  end
  redis.call('DEL', KEYS[1])
  return 2
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
""")

# The whole record and its TTL in one command (nil when there is no record). A key
# that is not a hash (someone SET it) answers the string 'WRONGTYPE': a corrupt
# record, not an outage; any other error reply stays an error.
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

# Counter on an existing session only; the error text comes back as a string.
_INCR = _Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local result = redis.pcall('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if type(result) == 'table' and result.err then
  return result.err
end
return result
""")

# The index lives as long as the longest session it can hold (0: no TTL).
_INDEX_ADD = _Script("""
redis.call('SADD', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl == 0 then
  redis.call('PERSIST', KEYS[1])
elseif redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
""")

# Revocation deletes a session only if it is still bound to that user.
_DELETE_IF_USER = _Script("""
if redis.call('HGET', KEYS[1], 'm:user') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")

# Take the whole index atomically, so a login racing a revoke stays indexed.
_TAKE_INDEX = _Script("""
local members = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return members
""")

_SCRIPTS = (_LOAD, _SAVE, _INCR, _INDEX_ADD, _DELETE_IF_USER, _TAKE_INDEX)


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
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix must be a string, got {key_prefix!r}")
        if not idle_timeout >= 0.001:
            raise ValueError(
                f"idle_timeout must be a positive number of seconds, got {idle_timeout!r}"
            )
        if absolute_lifetime is not None and not absolute_lifetime >= 0.001:
            raise ValueError(
                "absolute_lifetime must be a positive number of seconds or None, "
                f"got {absolute_lifetime!r}"
            )
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
        """Refresh the idle TTL at most once per tenth of the idle timeout."""
        return record_pttl < self.ttl_ms(created_ms) - self.idle_ms // 10

    # -- batches ------------------------------------------------------------------

    async def _batch(self, *commands: Command) -> list[Any]:
        """Run ``commands`` in one round trip (on Cluster: one per node involved).

        On NOSCRIPT (a restarted or flushed Redis) load the scripts and run the batch
        again: every batch we build is safe to repeat.
        """
        async with self.backend.call() as client:
            results = await self._send(client, commands)
            if any(isinstance(result, NoScriptError) for result in results):
                for script in _SCRIPTS:
                    await client.script_load(script.text)
                results = await self._send(client, commands)
            for result in results:
                if isinstance(result, Exception):
                    raise result  # inside call(): READONLY, WRONGTYPE... become a 503
        return results

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
        if created_ms is None:
            raise ValueError("no creation time")
        return Record(data, encoded, created_ms, user_id, pttl)

    async def save(
        self,
        session_id: str,
        *,
        create: bool,
        fields: dict[str, bytes],
        deleted: Iterable[str] = (),
        ttl_ms: int,
        drop: Iterable[tuple[str, str | None]] = (),
        bind: str | None = None,
        unbind: str | None = None,
    ) -> int:
        """Write a session in one round trip; returns SAVED, GONE or EMPTIED.

        ``fields``/``deleted`` are raw hash fields. ``drop`` lists old sessions
        (id, bound user) to delete first -- regenerate() and clear(). ``bind`` adds
        the session to a user's index, ``unbind`` removes it from one.
        """
        key = self.session_key(session_id)
        drop = list(drop)
        args: list[Any] = ["1" if create else "0", ttl_ms, len(fields)]
        for field, value in fields.items():
            args += [field, value]
        args += list(deleted)

        # Old records go first: if the batch fails half-way, a regenerated
        # session is lost (the user logs in again) rather than left usable.
        commands = self._drop_commands(drop)
        commands.append(_script(_SAVE, key, *args))
        if unbind is not None:
            commands.append(("SREM", self.user_key(unbind), session_id))
        if bind is not None:
            commands.append(_script(_INDEX_ADD, self.user_key(bind), session_id, self._index_ttl()))
        results = await self._batch(*commands)
        # Index of the script's reply: after one DEL (+ one SREM if bound) per old record.
        return int(results[sum(1 if user is None else 2 for _, user in drop)])

    def _drop_commands(self, drop: Iterable[tuple[str, str | None]]) -> list[Command]:
        commands: list[Command] = []
        for old_id, old_user in drop:
            commands.append(("DEL", self.session_key(old_id)))
            if old_user is not None:
                commands.append(("SREM", self.user_key(old_user), old_id))
        return commands

    async def delete(self, drop: Iterable[tuple[str, str | None]]) -> None:
        """Delete sessions (id, bound user) and their index entries; one round trip."""
        commands = self._drop_commands(drop)
        if commands:
            await self._batch(*commands)

    async def touch(self, session_id: str, ttl_ms: int) -> bool:
        """Refresh the idle TTL; False if the session no longer exists."""
        return bool(await self._one("PEXPIRE", self.session_key(session_id), ttl_ms))

    async def incr(self, session_id: str, key: str, amount: int) -> int | None:
        """Atomically add ``amount`` to ``session[key]``; ``None`` if the session is gone."""
        result = await self._one(*_script(_INCR, self.session_key(session_id), DATA + key, amount))
        if isinstance(result, bytes | str):
            raise TypeError(
                f"session[{key!r}] does not hold an integer, so it cannot be incremented "
                f"(Redis said: {_text(result)})"
            )
        return None if result is None else int(result)

    # -- per-user index -----------------------------------------------------------

    def _index_ttl(self) -> int:
        # A session bound now cannot outlive its absolute lifetime; with no absolute
        # lifetime sessions can live forever, and so does the index.
        return 0 if self.absolute_ms is None else self.absolute_ms

    async def user_sessions(self, user_id: str) -> list[SessionInfo]:
        """The live sessions bound to ``user_id``, oldest first.

        Entries of sessions that expired or were rebound are pruned on the way.
        """
        index = self.user_key(user_id)
        members = await self._one("SMEMBERS", index)
        ids = sorted(_text(member) for member in members)
        if not ids:
            return []
        commands: list[Command] = []
        for session_id in ids:
            commands.append(("HMGET", self.session_key(session_id), CREATED, USER))
            commands.append(("PTTL", self.session_key(session_id)))
        results = await self._batch(*commands)
        now = self.clock()
        infos: list[SessionInfo] = []
        stale: list[str] = []
        for i, session_id in enumerate(ids):
            (created, bound), pttl = results[2 * i], results[2 * i + 1]
            if created is None or bound is None or _text(bound) != user_id or pttl == -2:
                stale.append(session_id)
                continue
            expires_at = now + pttl / 1000 if pttl >= 0 else float("inf")
            infos.append(SessionInfo(handle_of(session_id), int(created) / 1000, expires_at))
        if stale:
            await self._one("SREM", index, *stale)
        infos.sort(key=lambda info: info.created_at)
        return infos

    async def revoke_user(self, user_id: str) -> int:
        """Delete every session bound to ``user_id`` ("log out everywhere").

        Returns how many sessions were deleted. Sessions of other users are never
        touched, even if the index is stale. Two round trips.
        """
        index = self.user_key(user_id)
        members = await self._one(*_script(_TAKE_INDEX, index))
        return await self._delete_bound(user_id, [_text(member) for member in members])

    async def revoke_session(self, user_id: str, handle: str) -> bool:
        """Delete the one session of ``user_id`` whose handle is ``handle``."""
        index = self.user_key(user_id)
        members = await self._one("SMEMBERS", index)
        for session_id in (_text(member) for member in members):
            if handle_of(session_id) == handle:
                deleted = await self._delete_bound(user_id, [session_id])
                await self._one("SREM", index, session_id)
                return deleted == 1
        return False

    async def _delete_bound(self, user_id: str, ids: list[str]) -> int:
        if not ids:
            return 0

        # One command per session: their keys live in different cluster slots.
        commands = [
            _script(_DELETE_IF_USER, self.session_key(session_id), user_id) for session_id in ids
        ]
        return sum(int(deleted) for deleted in await self._batch(*commands))
