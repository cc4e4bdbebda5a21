"""Saving a session: what changed since the load, written in as few round trips as
possible, and what the response must then tell the browser (:class:`CookieAction`).

``Session`` (``_session``) holds the state and the dict; :class:`SavePlan` is the
half of it that the middleware calls once the response starts. The order of the
writes -- and why a save that finds its record ended stores nothing -- is the
protocol described in ``_store``.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from ._record import CREATED, DATA, USER, handle_of
from ._scripts import SAVED
from ._store import SessionStore

logger = logging.getLogger("asgi_redis_kit.sessions")


def new_session_id() -> str:
    """256 random bits from ``secrets``, as 43 url-safe characters."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class CookieAction:
    """What the response must tell the browser after a save."""

    kind: Literal["set", "expire"]
    session_id: str = ""
    max_age: int = 0


class SavePlan:
    """The save half of :class:`~asgi_redis_kit.sessions.Session`, which sets this state."""

    _store: SessionStore
    _id: str | None
    _snapshot: dict[str, bytes]
    _snapshot_of: dict[str, Any]
    _created_ms: int
    _pttl_ms: int
    _stored_user: str | None
    _lineage: str
    _user: str | None
    _resign: bool
    _presented: bool
    _cleared: bool
    _drop: list[tuple[str, str | None]]
    _replaces: tuple[str, str | None] | None
    _lost: bool
    _saved: bool
    _warned_late: bool
    _wrote: bool

    def _encode_snapshot(self) -> tuple[dict[str, bytes], dict[str, Any]]:
        """Every value as it would be stored, and a copy of the values it was
        encoded from (``_snapshot`` and ``_snapshot_of``); the mapping (Session)
        defines it."""
        raise NotImplementedError

    def _differs(self) -> bool:
        """Whether the values no longer encode as ``_snapshot``; see Session."""
        raise NotImplementedError

    def _changed_since_save(self) -> bool:
        if self._drop or self._replaces or self._user != self._stored_user:
            return True
        try:
            return self._differs()
        except TypeError:  # an unserialisable value is a change we cannot save either
            return True

    async def _save(self) -> CookieAction | None:
        """Persist what changed, in at most one round trip; say what to do with
        the cookie: set it, expire it (only after :meth:`clear`), or nothing."""
        self._saved = True
        if self._lost:
            self._ended()
            return CookieAction("expire") if self._cleared and self._presented else None
        encoded, values = self._encode_snapshot()
        store = self._store
        if self._id is None:
            return await self._save_new(encoded, values)
        ttl = store.ttl_ms(self._created_ms)
        if ttl <= 0:
            # Reached its absolute lifetime during this request.
            await store.delete([(self._id, self._stored_user)])
            self._ended()  # the cookie's Max-Age runs out with it anyway
            return None
        fields = {DATA + k: v for k, v in encoded.items() if self._snapshot.get(k) != v}
        deleted = [DATA + k for k in self._snapshot if k not in encoded]
        bind = None
        if self._user != self._stored_user:
            # Indexed before the binding commits; the old user's entry stays, stale,
            # until the record is deleted (see _store).
            bind = self._user
            if self._user is None:
                deleted.append(USER)
            else:
                fields[USER] = self._user.encode()
        refreshed = bool(fields or deleted)
        if refreshed:
            self._wrote = True
            result = await store.save(
                self._id,
                create=False,
                fields=fields,
                deleted=deleted,
                ttl_ms=ttl,
                user=self._stored_user,
                bind=bind,
            )
            if result != SAVED:  # gone, emptied, or bound to someone else meanwhile
                self._ended()
                return None
        elif self._resign or store.touch_due(self._pttl_ms, self._created_ms):
            # An old-key cookie is re-signed only once the record is known to live
            # now: another request may have rotated or ended it since the load, and
            # the browser may already hold the newer cookie. One PEXPIRE, once.
            refreshed = True
            if not await store.touch(self._id, ttl, user=self._stored_user):
                self._ended()
                return None
        self._snapshot, self._snapshot_of = encoded, values
        self._stored_user = self._user
        # A Set-Cookie for an existing id only after this save found the record live
        # (a write or a touch). The cookie must outlive the session: with an absolute
        # lifetime its Max-Age already does; without one it follows each TTL refresh.
        if refreshed and (self._resign or store.absolute_ms is None):
            return CookieAction("set", self._id, store.cookie_max_age(self._created_ms))
        return None

    async def _save_new(
        self, encoded: dict[str, bytes], values: dict[str, Any]
    ) -> CookieAction | None:
        store = self._store
        drop = self._drop + ([self._replaces] if self._replaces else [])
        if not encoded and self._user is None:
            # Empty sessions are never stored; just finish what regenerate/clear began.
            self._wrote = self._wrote or bool(drop)
            await store.delete(drop)
            self._drop, self._replaces = [], None
            return CookieAction("expire") if self._cleared and self._presented else None
        # The record this one replaces (regenerate) or ends (clear): the loaded one.
        old = self._replaces or (self._drop[0] if self._drop else None)
        # A rotation, or clear() then bind_user() of the user it was bound to,
        # continues that session: same lifetime, and it must still live (and not
        # be under revoke) when it is replaced. A login starts a new lifetime.
        continues = old is not None and old[1] == self._user
        if continues and self._replaces is None and self._user is None:
            continues = False  # clear(), then anonymous data: a new session
        created = self._created_ms if continues else store.now_ms()
        ttl = store.ttl_ms(created)
        if ttl <= 0:  # the session it continues reached its absolute lifetime
            await store.delete(drop)
            self._ended()
            return None
        session_id = new_session_id()
        fields = {DATA + k: v for k, v in encoded.items()}
        fields[CREATED] = str(created).encode()
        if self._user is not None:
            fields[USER] = self._user.encode()
        self._wrote = True
        if old is not None and (continues or self._replaces is not None):
            # clear() moves a replaced record to _drop, so drop holds old at most.
            if not await store.replace(
                old, session_id, fields=fields, ttl_ms=ttl, user=self._user, lineage=self._lineage
            ):
                logger.info("session ended during the request; its new id was not kept")
                self._ended()
                return None
        else:
            await store.save(
                session_id, create=True, fields=fields, ttl_ms=ttl, drop=drop, bind=self._user
            )
        if not (continues and old is not None and self._user is not None):
            self._lineage = ""
        elif not self._lineage:
            self._lineage = handle_of(old[0])
        self._id, self._created_ms, self._pttl_ms = session_id, created, ttl
        self._snapshot, self._snapshot_of = encoded, values
        self._stored_user = self._user
        self._drop, self._replaces = [], None
        return CookieAction("set", session_id, store.cookie_max_age(created))

    def _ended(self) -> None:
        """The record is gone (emptied here, or ended by another request): nothing
        is stored and the cookie is left alone -- a cookie without a record is just
        an empty session, and the browser may hold a newer one by now."""
        self._id = None
        self._snapshot, self._snapshot_of = self._encode_snapshot()
        self._stored_user = self._user
        self._drop, self._replaces = [], None

    def _discard(self) -> None:
        """The response is an error: drop this request's changes."""
        self._saved = True
        self._warned_late = True

    def _changed_this_request(self) -> bool:
        """Whether this request changed the session, saved or not yet."""
        return self._wrote or self._changed_since_save()

    def _late_changes(self) -> bool:
        """True once if the session changed after it was saved (while streaming)."""
        if not self._saved or self._warned_late:
            return False
        if self._changed_since_save():
            self._warned_late = True
            return True
        return False
