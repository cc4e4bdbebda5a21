"""The per-user index: the sessions bound to a user, listing them and ending them.

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

The invariants (1-4) and the steps of ``regenerate()`` (a-c) referred to here,
and the saves these operations race with, are described in ``_store``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import BackendUnavailable
from ._base import StoreBase
from ._codec import is_utf8
from ._record import as_text, handle_of
from ._scripts import (
    DELETE_IF_USER,
    INDEX_ADD,
    INDEX_TTL,
    INFO,
    KILL,
    LINK,
    MARK_INDEX,
    TAKE_INDEX,
    Command,
    script,
)

logger = logging.getLogger("asgi_redis_kit.sessions")

# How long a revoke's marker in the index refuses successors at most: a revoke that
# dies half-way must not block rotations for long; one that runs takes far less.
REVOKE_GRACE_MS = 60_000
# A marker is the index member "!r:<deadline, server ms>:<token>"; no session id
# starts with "!" (they are url-safe base64).
MARKER = "!"


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


class UserIndex(StoreBase):
    """The index side of ``SessionStore``: deletes that un-index, listing, revoking."""

    def _kill_commands(self, drop: Iterable[tuple[str, str | None]]) -> list[Command]:
        return [script(KILL, self.session_key(old_id)) for old_id, _ in drop]

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
            others = (as_text(name) for name in noted)
            extra += self._srem_commands(old_id, (name for name in others if name != user))
        if extra:
            await self._batch(*extra)

    def _index_commands(self, user: str | None, *session_ids: str) -> list[Command]:
        if user is None or not session_ids:
            return []
        return [script(INDEX_ADD, self.user_key(user), self._index_ttl(), *session_ids)]

    async def delete(self, drop: Iterable[tuple[str, str | None]]) -> None:
        """Delete sessions (id, user it was loaded with), then un-index them from
        every user their records noted: one round trip on a single server, two on
        Cluster (one more when a record was noted for other users)."""
        drop = list(drop)
        if drop:
            killed, _ = await self._steps(self._kill_commands(drop), self._unindex_commands(drop))
            await self._unindex_noted(drop, killed)

    def _keep_index(self, user: str | None, ttl_ms: int) -> list[Command]:
        # Every TTL refresh of a bound session makes its index live at least as
        # long: the index's own TTL was set when an id was added, maybe by a store
        # with a shorter absolute lifetime than the one refreshing now.
        if user is None:
            return []
        return [script(INDEX_TTL, self.user_key(user), ttl_ms)]

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
            *(script(INFO, self.session_key(session_id)) for session_id in ids)
        )
        now = self.clock()
        infos: list[SessionInfo] = []
        dead: list[str] = []
        for session_id, reply in zip(ids, replies, strict=True):
            if not reply:
                dead.append(session_id)
                continue
            created, bound, pttl = reply
            if as_text(bound) != user_id:
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
        take = script(TAKE_INDEX, index, REVOKE_GRACE_MS, secrets.token_hex(8))
        marker, *members = await self._one(*take)
        ids = _session_ids(members)
        deleted, keep, after = await self._delete_bound(user_id, ids)
        # Entries of records bound elsewhere go back (maybe a bind to user_id in
        # flight), then the marker goes: the same key, so in order even on Cluster.
        await self._batch(*self._index_commands(user_id, *keep), ("SREM", index, marker), *after)
        self.stats.revoked += deleted
        return deleted

    async def _delete_bound(
        self, user_id: str, ids: list[str]
    ) -> tuple[int, list[str], list[Command]]:
        """Delete the records of ``ids`` still bound to ``user_id``: (how many, the
        ids live and bound elsewhere, the un-index of the deleted and dead ones)."""
        if not ids:
            return 0, [], []
        replies = await self._batch(
            *(script(DELETE_IF_USER, self.session_key(sid), user_id) for sid in ids)
        )
        deleted, keep, after = 0, [], []
        for session_id, reply in zip(ids, replies, strict=True):
            code, noted = kill_reply(reply)
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
        marked = await self._one(*script(MARK_INDEX, index, REVOKE_GRACE_MS, secrets.token_hex(8)))
        if not marked:
            return False
        marker, *members = marked
        ids = _session_ids(members)
        links = await self._batch(*(script(LINK, self.session_key(sid)) for sid in ids))
        # Successors form one line (each deletes the one it continues), named by its
        # first session's handle. The lines to end: the one ``handle`` is the first
        # of, the line of a session whose handle or predecessor it is. A successor
        # indexed after the marker is refused, so this snapshot holds them all.
        handles = {sid: handle_of(sid) for sid in ids}
        lines = {sid: handles[sid] for sid in ids}
        ended = {handle}
        for sid, link in zip(ids, links, strict=True):
            if link:
                prev, root = as_text(link[1]), as_text(link[2])
                lines[sid] = root or handles[sid]
                if handle in (handles[sid], prev):
                    ended.add(lines[sid])
        chain = [sid for sid in ids if lines[sid] in ended or handles[sid] == handle]
        deleted, _, after = await self._delete_bound(user_id, chain)
        await self._batch(("SREM", index, marker), *after)
        self.stats.revoked += deleted
        return deleted > 0


def kill_reply(reply: Any) -> tuple[int, list[str]]:
    """(code, noted users) from DELETE_IF_USER: 1 and the users when it deleted."""
    if isinstance(reply, list):
        return int(reply[0]), [as_text(user) for user in reply[1:]]
    return int(reply), []


def _session_ids(members: Iterable[bytes | str]) -> list[str]:
    """The session ids of an index, without its revocation markers."""
    return [text for text in map(as_text, members) if not text.startswith(MARKER)]


def check_user(user_id: object) -> None:
    """TypeError unless ``user_id`` can name a user: a non-empty str that Redis can
    store (valid UTF-8: no lone surrogates such as ``"\\ud800"``)."""
    # '' would match the sessions bound to nobody in the scripts.
    if not isinstance(user_id, str) or not user_id or not is_utf8(user_id):
        raise TypeError(f"user_id must be a non-empty string of valid UTF-8, got {user_id!r}")
