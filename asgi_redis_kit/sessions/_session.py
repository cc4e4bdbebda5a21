"""``request.session``: a dict that knows how to save only what changed.

Like Starlette's own ``Session`` it is a ``dict`` subclass, so handlers written for
Starlette keep working. Changes are not tracked on each write: at save time every
value is encoded again and compared with what was loaded, which also catches nested
mutation (``session["cart"].append(x)``) that no ``__setitem__`` hook can see.

This module holds the mapping, its state and the operations handlers call; the
save itself is :class:`~._saving.SavePlan`, and the stand-in for a session whose
load failed is in ``_unavailable``.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import HTTPConnection

from ..errors import BackendUnavailable, SessionNotLoaded, SessionStoreUnavailable
from ._codec import check, differs, encode, encode_all
from ._index import check_user
from ._record import Record, handle_of
from ._saving import SavePlan
from ._store import SessionStore

logger = logging.getLogger("asgi_redis_kit.sessions")


class Session(SavePlan, dict[str, Any]):
    """The session of one request: a ``dict[str, Any]`` of JSON-able values.

    Beyond the dict interface:

    * :meth:`regenerate` -- new id at save time, data kept (call it at login);
    * :meth:`clear` -- logout: the record is deleted and the cookie expired;
    * :meth:`incr` -- an atomic counter that concurrent requests cannot lose,
      committed at once (not rolled back when the handler fails);
    * :meth:`bind_user` / :attr:`user_id` -- the per-user index behind
      :meth:`SessionStore.user_sessions` and :meth:`SessionStore.revoke_user`;
    * :attr:`accessed`, :attr:`exposed`, :attr:`is_new`, :attr:`handle`, :attr:`store`;
    * :attr:`record_handle`, :attr:`changed`, :attr:`holds_data` -- for readers
      such as a response cache: they never raise and do not count as a use.

    Use :meth:`Session.of` to get it with its real type (Starlette types
    ``request.session`` as a plain dict).
    """

    # Tell Starlette's Request.session (and readers like the response cache) that
    # the response depends on the session.
    accessed: bool

    def __init__(
        self,
        store: SessionStore,
        *,
        session_id: str | None = None,
        record: Record | None = None,
        resign: bool = False,
        presented: bool = False,
        retry_after: int = 5,
    ) -> None:
        super().__init__(record.data if record is not None else {})
        self.accessed = False
        self._store = store
        # The id of the stored record; None until a new session is first saved.
        self._id = session_id if record is not None else None
        self._snapshot: dict[str, bytes] = dict(record.encoded) if record is not None else {}
        # The values _snapshot was encoded from, once a save encoded them (never the
        # loaded ones: a record written elsewhere may encode differently); see differs.
        self._snapshot_of: dict[str, Any] = {}
        self._created_ms = record.created_ms if record is not None else 0
        self._pttl_ms = record.pttl_ms if record is not None else 0
        self._stored_user = record.user_id if record is not None else None
        # The line of successors the loaded record belongs to (see _store).
        self._lineage = record.lineage if record is not None else ""
        self._user = self._stored_user
        self._resign = resign and record is not None
        # The request brought a validly signed cookie (with or without a record).
        self._presented = presented or record is not None
        # clear() was called: the one case where the response expires the cookie.
        self._cleared = False
        # Records to delete at save: (id, bound user), ended by clear().
        self._drop: list[tuple[str, str | None]] = []
        # The record regenerate() replaces: the new one carries its data and user, so
        # it is kept only if this one still lives when it is deleted (_store.replace).
        self._replaces: tuple[str, str | None] | None = None
        # incr() found the record ended by another request: like a save that finds
        # it gone, nothing of this request is saved.
        self._lost = False
        self._saved = False
        self._warned_late = False
        self._retry_after = retry_after
        # This request was told the store is down (SessionStoreUnavailable raised).
        self._store_failed = False
        # This request changed the stored session (incr, or a save that wrote).
        self._wrote = False

    def __repr__(self) -> str:
        # Never the id: reprs end up in logs and tracebacks.
        return f"<Session {dict.__repr__(self)} new={self._id is None}>"

    # -- storing values: refused at once if they could not come back unchanged ----
    # (see _codec). Nested mutation is only seen by the save, which raises then.

    def __setitem__(self, key: str, value: Any) -> None:
        check(key, value)
        dict.__setitem__(self, key, value)  # not super(): the visit counter's path

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            check(key, default)
        return super().setdefault(key, default)

    def update(self, /, *args: Any, **kwargs: Any) -> None:
        new = dict(*args, **kwargs)  # all or nothing: check every value first
        for key, value in new.items():
            check(key, value)
        super().update(new)

    # mypy sets |= against dict.__or__; typeshed's own dict.__ior__ needs this ignore too.
    def __ior__(self, other: Any) -> Session:  # type: ignore[misc,override]
        self.update(other)
        return self

    @classmethod
    def of(cls, conn: HTTPConnection) -> Session:
        """The session of a request or websocket, typed as :class:`Session`."""
        session = conn.scope.get("session")
        if not isinstance(session, Session):
            raise SessionNotLoaded(
                "this request has no asgi_redis_kit session; add "
                "SessionMiddleware(app, secret_key=..., redis=...) around the app"
            )
        session.mark_accessed()
        return session

    # -- state --------------------------------------------------------------------

    def mark_accessed(self) -> None:
        """Called by Starlette's ``request.session``: the response varies on it."""
        self.accessed = True

    @property
    def exposed(self) -> bool:
        """Whether a response may depend on this session: it was asked for
        (:attr:`accessed`), or it has a stored record, a bound user or data that
        this request could reach by a path no hook sees -- ``scope["session"]``
        read by C code such as ``orjson.dumps``, ``dict(...)``, ``{**session}``,
        an auth library reading ``user_id`` -- so a shared cache must treat it
        as read. Never raises, even on the stand-in for a session whose load
        failed."""
        return (
            self.accessed
            or self._id is not None
            or self._user is not None
            or bool(self._snapshot)
            or dict.__len__(self) > 0
        )

    @property
    def is_new(self) -> bool:
        """True until the session has a record in Redis."""
        return self._id is None

    @property
    def handle(self) -> str | None:
        """A non-secret name of the stored session (see :class:`SessionInfo`)."""
        return None if self._id is None else handle_of(self._id)

    # -- for readers like the response cache: never raise, never mark accessed ---

    @property
    def record_handle(self) -> str | None:
        """The handle of the stored record this session is bound to now; ``None``
        for a new session, one whose cookie was unknown or whose record ended,
        and the stand-in for a session whose load failed. Unlike
        :attr:`handle`, never raises and does not count as using the session."""
        return None if self._id is None else handle_of(self._id)

    @property
    def changed(self) -> bool:
        """Whether this request changed the session, saved or not yet. Never
        raises and does not count as using the session."""
        return self._changed_this_request()

    @property
    def holds_data(self) -> bool:
        """Whether the session belongs to someone: it has a stored record, or
        holds data now or did when loaded. Never raises and does not count as
        using the session."""
        return self.record_handle is not None or dict.__len__(self) > 0 or bool(self._snapshot)

    @property
    def user_id(self) -> str | None:
        # Reading who the session belongs to is using it (Vary: Cookie). The cache
        # needs no such mark: a bound session is exposed anyway.
        self.accessed = True
        return self._user

    @property
    def store(self) -> SessionStore:
        return self._store

    # -- operations ---------------------------------------------------------------

    def regenerate(self) -> None:
        """Give the session a new id when it is saved, keeping its data (login).

        The old record is deleted, so a copy of the old cookie gets an empty session.
        The new record is kept only if the old one still lived when it was deleted:
        if it was revoked, logged out or expired during this request, nothing is
        stored and no cookie is set (the login does not go through). The same holds
        while a revoke of the bound user runs. When the bound user stays the same (a
        rotation), the new id keeps the creation time: the absolute lifetime runs on.
        """
        self.accessed = True
        old = self._forget_record()
        if old is not None:
            self._replaces = old

    def clear(self) -> None:
        """Log out: empty the session, delete its record and expire the cookie.

        Data set after ``clear()`` in the same request goes into a new session with
        a new id. Followed by ``bind_user()`` of the user the session was bound to
        (a re-authentication), that new session continues the old one like
        :meth:`regenerate`: same lifetime, and nothing is stored if the old one was
        revoked, logged out or expired during the request.

        Only ``clear()`` expires the cookie: a session that ended some other way
        (emptied, revoked, expired, or rotated by a login in another request) gets
        no ``Set-Cookie``, because the browser may already hold a newer cookie that
        a ``Max-Age=0`` on this response would erase.
        """
        self.accessed = True
        self._cleared = True
        super().clear()
        # Nothing is carried over any more: a record regenerate() replaced is just
        # deleted now, like the loaded one.
        for old in (self._replaces, self._forget_record()):
            if old is not None:
                self._drop.append(old)
        self._replaces = None
        self._user = None

    def bind_user(self, user_id: str) -> None:
        """Bind the session to ``user_id`` when it is saved, adding it to that user's
        index. Call :meth:`regenerate` at login too, against session fixation."""
        check_user(user_id)
        self.accessed = True
        self._user = user_id

    async def incr(self, key: str, amount: int = 1) -> int:
        """Add ``amount`` to the integer ``session[key]`` (missing counts as 0) and
        return the new value.

        On a stored session this is one atomic Redis command, so concurrent
        requests never lose a count. It is **committed at once and not rolled back**:
        unlike every other change, it stays even if the handler then raises or
        answers 5xx (returning the new value needs Redis to have applied it). Call
        it last if a failure should not count. On a session nobody else can see yet
        (new, or regenerated or cleared in this request) it is a local change, saved
        with the rest -- and dropped with the rest on an error. It works on the
        stored value: an unsaved assignment to ``key`` earlier in the same request
        is replaced by the result. If the session was logged out, revoked, expired
        or rebound by another request meanwhile, the count starts from 0 in an empty
        session that is not saved: nothing of this request is stored.
        """
        check(key, 0)  # the key must be one an assignment accepts (valid UTF-8)
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError(f"amount must be an int, got {amount!r}")
        self.accessed = True
        if self._id is not None:
            try:
                value = await self._store.incr(self._id, key, amount, user=self._stored_user)
            except BackendUnavailable as exc:
                self._store_failed = True
                raise SessionStoreUnavailable(self._retry_after) from exc
            if value is not None:
                self._wrote = True
                dict.__setitem__(self, key, value)
                self._snapshot[key] = encode(key, value)
                self._snapshot_of[key] = value
                return value
            # Logged out, revoked, expired or rebound by another request meanwhile:
            # that wins, so the rest of this request is not saved either.
            logger.info("session ended during the request; this request's changes are dropped")
            super().clear()
            self._id = None
            self._snapshot, self._snapshot_of = {}, {}
            self._user = self._stored_user = None
            self._lost = True
        current = self.get(key, 0)
        if isinstance(current, bool) or not isinstance(current, int):
            raise TypeError(f"session[{key!r}] is {current!r}, not an integer")
        self[key] = current + amount
        return current + amount

    def _forget_record(self) -> tuple[str, str | None] | None:
        """Detach from the loaded record; returns it (id, bound user), if any."""
        old = None if self._id is None else (self._id, self._stored_user)
        self._id = None
        self._snapshot, self._snapshot_of = {}, {}
        self._stored_user = None
        return old

    # -- saving (called by the middleware; see _saving) ---------------------------

    def _encode_snapshot(self) -> tuple[dict[str, bytes], dict[str, Any]]:
        values = dict.copy(self)
        return encode_all(values), values

    def _differs(self) -> bool:
        return differs(self, self._snapshot, self._snapshot_of)
