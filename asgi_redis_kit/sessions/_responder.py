"""Saving the session as the response starts, and adding its ``Set-Cookie``.

The start message is the last moment a ``Set-Cookie`` can still be added, so the
save runs there -- only for statuses below 500 -- and a save that fails (Redis down)
replaces the response with the middleware's 503.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from starlette.datastructures import MutableHeaders
from starlette.types import Message, Scope, Send

from ..errors import BackendUnavailable
from ._saving import CookieAction
from ._session import Session

if TYPE_CHECKING:
    from ._middleware import SessionMiddleware

logger = logging.getLogger("asgi_redis_kit.sessions")


class Responder:
    """Per-request state: saves the session as the response starts."""

    __slots__ = ("middleware", "replaced", "scope", "send_downstream", "session", "started")

    def __init__(
        self, middleware: SessionMiddleware, scope: Scope, session: Session, send: Send
    ) -> None:
        self.middleware = middleware
        self.scope = scope
        self.session = session
        self.send_downstream = send
        self.started = False
        # True once our 503 replaced the app's response; the app's messages are dropped.
        self.replaced = False

    async def send(self, message: Message) -> None:
        if self.replaced:
            return
        kind = message["type"]
        if kind == "http.response.start":
            await self._start(message)
            return
        await self.send_downstream(message)
        finished = kind == "http.response.body" and not message.get("more_body", False)
        if finished and self.session._late_changes():
            logger.warning(
                "session changed after the response headers were sent "
                "(in a streaming body or background task); those changes are not saved"
            )

    async def _start(self, message: Message) -> None:
        session = self.session
        action: CookieAction | None = None
        if message["status"] == 500 and session._store_failed:
            # An error handler between us and the failure (Starlette's
            # ServerErrorMiddleware inside ours) made a 500 of the store's 503.
            self.replaced = True
            await self.middleware._unavailable(self.send_downstream)
            return
        if message["status"] >= 500:
            if message["status"] == 503 and session._store_failed:
                # The placeholder's SessionStoreUnavailable, answered by the app's
                # exception handling instead of our _unavailable().
                self.middleware.store.stats.unavailable += 1
            session._discard()
        else:
            started = time.monotonic()
            try:
                action = await session._save()
            except BackendUnavailable as exc:
                logger.warning(
                    "session store unavailable while saving (%s after %.2fs); answering 503",
                    exc,
                    time.monotonic() - started,
                )
                self.replaced = True
                await self.middleware._unavailable(self.send_downstream)
                return
            if session._cleared:
                self.middleware.store.stats.cleared += 1
        message.setdefault("headers", [])
        headers = MutableHeaders(scope=message)
        if session.accessed and not _varies_on_cookie(headers):
            headers.add_vary_header("Cookie")
        if action is not None:
            scheme = self.scope.get("scheme", "http")
            cookie = self.middleware.cookie
            if action.kind == "set":
                value = self.middleware.signer.sign(action.session_id)
                headers.append(
                    "set-cookie", cookie.set_cookie(value, action.max_age, scheme=scheme)
                )
            else:
                headers.append("set-cookie", cookie.expire_cookie(scheme=scheme))
        self.started = True
        await self.send_downstream(message)


def _varies_on_cookie(headers: MutableHeaders) -> bool:
    return any(
        token.strip().lower() in ("cookie", "*")
        for value in headers.getlist("vary")
        for token in value.split(",")
    )
