"""A minimal in-process ASGI driver.

It builds the scope and the receive/send callables by hand so that the time measured
is the app's and its middleware's, not an HTTP client's (httpx's ASGITransport costs
more per request than the middleware differences we want to see).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from starlette.types import ASGIApp, Message

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Reply:
    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def set_cookies(self) -> list[str]:
        return [v.decode("latin-1") for k, v in self.headers if k == b"set-cookie"]


class CookieJar:
    """Just enough of a browser: keeps the last value of each cookie set, drops expired
    ones, and sends them all back."""

    def __init__(self) -> None:
        self.cookies: dict[str, str] = {}

    def update(self, reply: Reply) -> None:
        for raw in reply.set_cookies():
            first, _, attrs = raw.partition(";")
            name, _, value = first.strip().partition("=")
            low = attrs.lower().replace(" ", "")
            if "max-age=0" in low or "1970" in low or value in ("", "''", '""', "null"):
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value

    def header(self) -> Headers:
        if not self.cookies:
            return []
        return [(b"cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()).encode())]


# What a browser sends on a plain navigation, so per-header work costs what it costs.
_BASE_HEADERS: Headers = [
    (b"host", b"bench.local"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"),
    (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"accept-language", b"es-ES,es;q=0.9,en;q=0.8"),
    (b"accept-encoding", b"gzip, deflate, br"),
    (b"connection", b"keep-alive"),
    (b"upgrade-insecure-requests", b"1"),
    (b"sec-fetch-dest", b"document"),
    (b"sec-fetch-mode", b"navigate"),
    (b"sec-fetch-site", b"none"),
]


async def call(
    app: ASGIApp,
    path: str,
    *,
    query: str = "",
    method: str = "GET",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> Reply:
    """One HTTP request through ``app``; returns the collected response."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [*_BASE_HEADERS, *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("bench.local", 80),
        "state": {},
    }
    reply = Reply()
    chunks: list[bytes] = []
    done = asyncio.Event()
    sent_request = False

    async def receive() -> Message:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # As a server does: nothing more until the response is over, then a disconnect.
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            reply.status = message["status"]
            reply.headers = list(message.get("headers", ()))
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                chunks.append(body)
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    reply.body = b"".join(chunks) if len(chunks) != 1 else chunks[0]
    return reply


class Lifespan:
    """Runs the app's lifespan startup on enter and shutdown on exit."""

    def __init__(self, app: ASGIApp, timeout: float = 10.0) -> None:
        self.app = app
        self.timeout = timeout
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

        async def serve() -> None:
            await self.app(scope, self._inbox.get, self._outbox.put)

        self._task = asyncio.create_task(serve())
        await self._inbox.put({"type": "lifespan.startup"})
        message = await asyncio.wait_for(self._outbox.get(), self.timeout)
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"lifespan startup failed: {message!r}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._outbox.get(), self.timeout)
            await asyncio.wait_for(self._task, self.timeout)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
