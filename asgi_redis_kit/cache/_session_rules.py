"""The session rules of a cached request: who the session says the visitor is
(for a ``vary_on_session`` key), whether the request carries a session, and
whether the handler read, changed or misread it (then its response is not
stored). They use only SessionMiddleware's and Session's public readers
(``identify``, ``handling``, ``cookie_name``, ``record_handle``, ``changed``,
``holds_data``, ``accessed``, ``exposed``) and Starlette's mapping otherwise.

Sessions: the middleware learns the session cookie's name from the
SessionMiddleware (ours or Starlette's) it finds in the app on the first
request. A request that carries that cookie, or comes with a session loaded
outside us that came from a cookie or holds data, bypasses a route shared by
everyone (neither ``vary_on_session`` nor ``ignores_session``) before any
lookup: an empty session's page must never be served to a live one. A
``vary_on_session`` key also holds every other cookie (``_keys``). Finding the
middleware is not relied on: a ``vary_on_session`` response is not stored when
the key named no one yet the session the handler saw is someone's, nor any
response when the SessionMiddleware that handled the request (its scope mark)
reads another cookie than the key named (one warning says so). With a session
middleware *outside* the cache, ``scope["session"]`` is already loaded when we
run: a shared route whose handler read it is not stored, and a
``vary_on_session`` entry is keyed on the loaded session's handle (a new or
unknown session is no session) instead of the raw cookie. With our
SessionMiddleware *inside* the cache, a ``vary_on_session`` key is made from
the cookie's session id (verified with that middleware's signer; a bad
signature is no session), and its lookup proves the session still exists: an
EXISTS in the same script on a single server, in the same pipeline on
Cluster, or sent concurrently to the session store when that is another
server. A logged-out, revoked or expired session's cookie is never served its
cached pages: the app runs and sees an anonymous session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from starlette.types import Scope

from .._http import cookie_values
from .._redis import Backend
from ..sessions import Session, SessionMiddleware
from ._storage import SessionProof

logger = logging.getLogger("asgi_redis_kit.cache")

_NO_SESSION = object()


class SessionWarnings:
    """The warnings a CacheMiddleware gives once each about the sessions it meets."""

    def __init__(self) -> None:
        self._foreign = False
        self._cookie_name = False

    def foreign_session(self, session: object) -> None:
        if self._foreign:
            return
        self._foreign = True
        logger.warning(
            "scope['session'] is a %s, not asgi_redis_kit's Session: the cache cannot "
            "tell whether a handler read it, so a response of a route without "
            "vary_on_session=True is stored only when that session is empty (and, "
            "with the session middleware inside the cache, the request has no "
            "cookie). Use asgi_redis_kit.SessionMiddleware to cache pages for "
            "visitors who have a session.",
            type(session).__name__,
        )

    def cookie_name(self, actual: str, keyed: str) -> None:
        if self._cookie_name:
            return
        self._cookie_name = True
        logger.warning(
            "the SessionMiddleware that handled a request reads the cookie %r, but the "
            "cache keys on the cookie %r: it could not find that middleware in the app "
            "(a middleware between them keeps its inner app somewhere other than .app). "
            "Nothing is stored until this is fixed: pass "
            "CacheMiddleware(session_cookie=%r), or expose the inner app as .app.",
            actual,
            keyed,
            actual,
        )


class SessionRules:
    """One request's view of its session, from the cookie and ``scope["session"]``.

    ``sessions``: our SessionMiddleware found in the app (inside the cache, so
    it has not loaded the session yet), or None. ``prove_on``: where a
    per-user lookup checks that a session's record still exists, given the
    session store's backend (None: the cache's own server, in its own round trip).
    """

    def __init__(
        self,
        scope: Scope,
        headers: Mapping[bytes, bytes],
        *,
        cookie_name: str,
        sessions: SessionMiddleware | None,
        ignores_session: bool,
        prove_on: Callable[[Backend], Backend | None],
        warnings: SessionWarnings,
    ) -> None:
        self.scope = scope
        self.headers = headers
        self.cookie_name = cookie_name
        self.sessions = sessions
        self.ignores_session = ignores_session
        self.prove_on = prove_on
        self.warnings = warnings
        # Every value of the session cookie, parsed once for all the rules below.
        self.cookies = cookie_values(scope, cookie_name)
        # A session middleware outside us already loaded the session (and sees no
        # Vary we could act on from here): it, not the cookie, says who asks.
        self.outer: object = scope.get("session", _NO_SESSION)
        # What a session middleware we cannot ask held before the app ran.
        self.before: dict[Any, Any] | None = None
        # The session a vary_on_session hit must prove still exists (set by identity).
        self.proof: SessionProof | None = None

    def before_app(self) -> None:
        """Note what a foreign session outside us holds before the app runs
        (taken then, not per request: a hit never runs the app and never needs it)."""
        outer = self.outer
        if isinstance(outer, Mapping) and not isinstance(outer, Session):
            self.before = dict(outer)

    def identity(self) -> bytes | Literal["cookie"] | None:
        """Who the session says the user is, for a ``vary_on_session`` key
        (``None``: no session). With our SessionMiddleware inside, the cookie is
        verified with its signer and a hit must prove the session still exists
        (:attr:`proof`)."""
        outer = self.outer
        if isinstance(outer, Session):
            handle = outer.record_handle  # None: new, unknown, ended or unavailable
            return None if handle is None else handle.encode()
        sessions = self.sessions
        if outer is not _NO_SESSION or sessions is None:
            return "cookie"
        found = sessions.identify(self.scope)
        if found is None:
            return None  # no cookie, or a bad signature: SessionMiddleware ignores it
        self.proof = SessionProof(found.record_key, self.prove_on(found.backend))
        return found.fingerprint

    def read(self) -> bool:
        """Whether the response may depend on a session's contents (review
        finding 2). Reads cannot all be seen: a handler, or the auth or CSRF
        library it calls, may read ``scope["session"]`` directly, through any
        dict method, ``dict(s)``, ``{**s}``, ``json.dumps`` or C code such as
        ``orjson.dumps``. So, by design, a session that holds data the handler
        could reach counts as read, whatever path it took; an empty one has
        nothing to give away unless it was asked for.

        * our Session, outside or inside us: :attr:`Session.exposed`;
        * another middleware's mapping outside us: it held data before the app
          ran, or holds some now;
        * another middleware's mapping inside us (loaded after we ran, so its
          contents before the handler are unknown): it holds data, or the
          request carries any cookie that could be its;
        * anything else in ``scope["session"]``: read.

        A route marked ``ignores_session`` promised not to read it: only a read
        that is seen (our Session's :attr:`~Session.accessed`) counts there."""
        outer = self.outer
        if self.ignores_session:
            session = outer if outer is not _NO_SESSION else self.scope.get("session")
            return isinstance(session, Session) and session.accessed
        if outer is not _NO_SESSION:
            if isinstance(outer, Session):
                return outer.exposed
            self.warnings.foreign_session(outer)
            if isinstance(outer, Mapping):
                return bool(self.before) or len(outer) > 0
            return True
        inner = self.scope.get("session", _NO_SESSION)
        if inner is _NO_SESSION or inner is None:
            return False
        if isinstance(inner, Session):
            return inner.exposed
        self.warnings.foreign_session(inner)
        empty = isinstance(inner, Mapping) and len(inner) == 0
        return not empty or b"cookie" in self.headers

    def carries(self) -> bool:
        """Whether the request comes with a session: the session cookie, or a
        session already loaded outside us that came from a cookie or holds
        data (whatever its cookie is called: we may not have found its name)."""
        if self.cookies:
            return True
        outer = self.outer
        if outer is _NO_SESSION or outer is None:
            return False
        if isinstance(outer, Session):
            return outer.record_handle is not None or outer.exposed
        return not isinstance(outer, Mapping) or len(outer) > 0

    def holds_data(self) -> bool:
        """Whether the session the handler could see belongs to someone: ours
        was loaded from a cookie or holds data; another middleware's mapping
        holds or held data; anything else in ``scope["session"]`` is unknown."""
        session = self.outer
        if session is _NO_SESSION:
            session = self.scope.get("session", _NO_SESSION)
        if session is _NO_SESSION or session is None:
            return False
        if isinstance(session, Session):
            return session.holds_data
        if isinstance(session, Mapping):
            return bool(self.before) or len(session) > 0
        return True

    def misread_cookie(self) -> bool:
        """Whether the SessionMiddleware that handled the request reads another
        cookie than the key named (it hid from us): no key of ours told its
        visitors apart."""
        handler = SessionMiddleware.handling(self.scope)
        if handler is None or handler.cookie_name == self.cookie_name:
            return False
        self.warnings.cookie_name(handler.cookie_name, self.cookie_name)
        return True

    def changed(self) -> bool:
        """Whether the handler changed its session. A hit would skip the change.
        And with the session middleware outside us, its save and the Set-Cookie
        of a new session come after we see the response: stored, one visitor's
        new session's page would be every anonymous visitor's."""
        outer = self.outer
        if self.before is not None and isinstance(outer, Mapping):
            return dict(outer) != self.before
        session = outer if outer is not _NO_SESSION else self.scope.get("session")
        return isinstance(session, Session) and session.changed
