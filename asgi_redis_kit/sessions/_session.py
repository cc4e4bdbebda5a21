"""``request.session``: a dict that knows how to save only what changed.

Like Starlette's own ``Session`` it is a ``dict`` subclass, so handlers written for
Starlette keep working. Changes are not tracked on each write: at save time every
value is encoded again and compared with what was loaded, which also catches nested
mutation (``session["cart"].append(x)``) that no ``__setitem__`` hook can see.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from starlette.requests import HTTPConnection

from ..errors import BackendUnavailable, SessionNotLoaded, SessionStoreUnavailable
from ._codec import check, encode, encode_all
from ._index import check_user
from ._record import CREATED, DATA, USER, Record, handle_of
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


class Session(dict[str, Any]):
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
                return value
            # Logged out, revoked, expired or rebound by another request meanwhile:
            # that wins, so the rest of this request is not saved either.
            logger.info("session ended during the request; this request's changes are dropped")
            super().clear()
            self._id = None
            self._snapshot = {}
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
        self._snapshot = {}
        self._stored_user = None
        return old

    # -- saving (called by the middleware) ----------------------------------------

    def _encoded(self) -> dict[str, bytes]:
        return encode_all(self)

    def _changed_since_save(self) -> bool:
        if self._drop or self._replaces or self._user != self._stored_user:
            return True
        try:
            return self._encoded() != self._snapshot
        except TypeError:  # an unserialisable value is a change we cannot save either
            return True

    async def _save(self) -> CookieAction | None:
        """Persist what changed, in at most one round trip; say what to do with
        the cookie: set it, expire it (only after :meth:`clear`), or nothing."""
        self._saved = True
        if self._lost:
            self._ended()
            return CookieAction("expire") if self._cleared and self._presented else None
        encoded = self._encoded()
        store = self._store
        if self._id is None:
            return await self._save_new(encoded)
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
        self._snapshot = encoded
        self._stored_user = self._user
        # A Set-Cookie for an existing id only after this save found the record live
        # (a write or a touch). The cookie must outlive the session: with an absolute
        # lifetime its Max-Age already does; without one it follows each TTL refresh.
        if refreshed and (self._resign or store.absolute_ms is None):
            return CookieAction("set", self._id, store.cookie_max_age(self._created_ms))
        return None

    async def _save_new(self, encoded: dict[str, bytes]) -> CookieAction | None:
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
        self._snapshot = encoded
        self._stored_user = self._user
        self._drop, self._replaces = [], None
        return CookieAction("set", session_id, store.cookie_max_age(created))

    def _ended(self) -> None:
        """The record is gone (emptied here, or ended by another request): nothing
        is stored and the cookie is left alone -- a cookie without a record is just
        an empty session, and the browser may hold a newer one by now."""
        self._id = None
        self._snapshot = self._encoded()
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


class UnavailableSession(Session):
    """Stands in for a session whose load failed (Redis down or too slow).

    A request that never touches its session is answered normally, cookie or not;
    the first use of this one -- ``request.session``, any read or write of the
    mapping, :meth:`incr`, :meth:`regenerate`, :meth:`clear`, :meth:`bind_user`,
    :attr:`user_id`... -- raises :class:`SessionStoreUnavailable` (a 503). It is
    never saved and never sets a cookie, so nothing stored is overwritten.
    """

    def __init__(self, store: SessionStore, *, retry_after: int) -> None:
        super().__init__(store, retry_after=retry_after)

    def _fail(self) -> NoReturn:
        self.accessed = True
        self._store_failed = True
        raise SessionStoreUnavailable(self._retry_after)

    def __repr__(self) -> str:
        return "<Session unavailable: the session store did not answer>"

    def _changed_since_save(self) -> bool:
        return False  # nothing can change it: every write raises

    def _changed_this_request(self) -> bool:
        return False

    # Starlette's request.session calls this: asking for the session is using it.
    def mark_accessed(self) -> None:
        self._fail()

    @property
    def is_new(self) -> bool:
        self._fail()

    @property
    def handle(self) -> str | None:
        self._fail()

    @property
    def user_id(self) -> str | None:
        self._fail()

    def regenerate(self) -> None:
        self._fail()

    def clear(self) -> None:
        self._fail()

    def bind_user(self, user_id: str) -> None:
        self._fail()

    async def incr(self, key: str, amount: int = 1) -> int:
        self._fail()

    def __getitem__(self, key: str) -> Any:
        self._fail()

    def __setitem__(self, key: str, value: Any) -> None:
        self._fail()

    def __delitem__(self, key: str) -> None:
        self._fail()

    def __contains__(self, key: object) -> bool:
        self._fail()

    def __iter__(self) -> Iterator[str]:
        self._fail()

    def __reversed__(self) -> Iterator[str]:
        self._fail()

    def __len__(self) -> int:
        self._fail()

    def __eq__(self, other: object) -> bool:
        self._fail()

    def __ne__(self, other: object) -> bool:
        self._fail()

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> Any:
        self._fail()

    def __ror__(self, other: Any) -> Any:
        self._fail()

    def __ior__(self, other: Any) -> Any:
        self._fail()

    def get(self, *args: Any) -> Any:
        self._fail()

    def keys(self) -> Any:
        self._fail()

    def values(self) -> Any:
        self._fail()

    def items(self) -> Any:
        self._fail()

    def pop(self, *args: Any) -> Any:
        self._fail()

    def popitem(self) -> tuple[str, Any]:
        self._fail()

    def setdefault(self, *args: Any) -> Any:
        self._fail()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._fail()

    def copy(self) -> dict[str, Any]:
        self._fail()

    async def _save(self) -> CookieAction | None:
        return None  # never saved: there is nothing loaded to save over
