"""Test helpers: real redis-server processes and a client that counts its commands."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import OutOfMemoryError
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Terminate ``proc``, and kill it if it has not gone within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Wait until ``proc`` (a server we started) accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the server did not listen on port {port} within {timeout:.0f} s")


class Tally:
    """A count that a test waits on (``await tally.reach(n)``) where a sleep would
    only hope that enough had happened meanwhile."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        self._changed.set()

    async def reach(self, count: int) -> None:
        while self.count < count:
            self._changed.clear()
            await self._changed.wait()


class Arrivals(Tally):
    """An ASGI wrapper counting the HTTP requests that reached ``app``: ``await
    app.reach(n)`` returns once a burst of ``n`` is in flight."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__()
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.add()
        await self.app(scope, receive, send)


class RedisProcess:
    """A throwaway ``redis-server`` on a free loopback port that tests may stop,
    restart, pause (SIGSTOP) and resume. Nothing is persisted to disk."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            # A failure, not a skip: CI must not pass without a real Redis.
            raise RuntimeError(
                "redis-server is not installed and REDIS_URL is not set; "
                "run the tests with ./dev test, which installs it"
            )
        self.binary = binary
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="ark-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--protected-mode", "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            stop_process(self.proc)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisSpy:
    """Counts what a client sends: commands by name and socket round trips.

    A pipeline or transaction is one round trip however many commands it
    carries; that is the number the library promises to keep small.
    """

    def __init__(self) -> None:
        self.commands: Counter[str] = Counter()
        self.round_trips = 0

    def reset(self) -> None:
        self.commands.clear()
        self.round_trips = 0

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    def connection_class(self) -> type[Connection]:
        spy = self

        class CountingConnection(Connection):
            def pack_command(self, *args: Any) -> list[bytes]:
                name = args[0]
                spy.commands[(name.decode() if isinstance(name, bytes) else str(name)).upper()] += 1
                return super().pack_command(*args)

            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                spy.round_trips += 1
                await super().send_packed_command(command, check_health)

        return CountingConnection


def counting_client(url: str, spy: RedisSpy, **kwargs: Any) -> Redis:
    """A client on ``url`` whose traffic ``spy`` counts. No handshake commands
    (CLIENT SETINFO) or health checks are sent, so only the library's own
    commands show up."""
    client: Redis = Redis.from_url(
        url,
        connection_class=spy.connection_class(),
        driver_info=None,
        **kwargs,
    )
    return client


class DelayProxy:
    """An asyncio TCP proxy on loopback in front of a Redis server that delays what
    flows through it, for tests and the soak bench (it needs no pytest).

    ``latency`` (seconds) may be changed at any time, e.g. ``proxy.latency = 0.05``;
    it applies to chunks read from then on. It is a delay line, not a queue of
    sleeps: each chunk read from one side is written to the other ``latency`` after
    it arrived, in order, so pipelined traffic is not slowed further.

    Parameters:
        upstream_port, upstream_host: the Redis server behind the proxy.
        latency: the delay added to every chunk flowing in ``direction``.
        direction: ``"replies"`` (server to client, the default: a command runs at
            once in Redis and its reply arrives late, so a client that gives up
            waiting gives up *mid-reply*), ``"requests"``, or ``"both"``.
        split: when above 0, the first ``split`` bytes of each delayed chunk go at
            once and only the rest waits, leaving the client holding half a reply.
        port: the port to listen on; a free one by default. It is kept across
            ``stop()`` and ``start()``.

    ``open_connections`` counts client connections open right now, ``accepted``
    all of them ever, ``peak`` the most open at once, and ``discarded`` the
    chunks still waiting in the delay line when their connection closed (replies
    a client gave up on). ``chunks["requests"]`` and ``chunks["replies"]`` count the
    reads from each side: one per write burst, so a command or a whole pipeline
    is usually one, which makes ``chunks["requests"]`` a count of round trips.
    ``await proxy.until_chunks(side, n)`` waits for ``chunks[side]`` to reach ``n``:
    once a reply has been read from Redis, its command has run there, and while
    the latency holds it back, its client is waiting for it.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = "127.0.0.1",
        latency: float = 0.0,
        direction: str = "replies",
        split: int = 0,
        port: int = 0,
    ) -> None:
        if direction not in ("replies", "requests", "both"):
            raise ValueError(f"direction must be replies, requests or both, got {direction!r}")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.latency = latency
        self.direction = direction
        self.split = split
        self.port = port
        self.open_connections = 0
        self.accepted = 0
        self.peak = 0
        self.discarded = 0
        self.chunks: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._chunk_read = asyncio.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> DelayProxy:
        if self._server is not None:
            return self
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and close every connection, delayed data included."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._links):
            task.cancel()
        # Each link closes its own sockets on the way out; bounded by the timeout.
        if self._links:
            await asyncio.wait(list(self._links), timeout=10)
        if server is not None:
            await server.wait_closed()

    async def until_chunks(self, side: str, count: int) -> None:
        while self.chunks[side] < count:
            self._chunk_read.clear()
            await self._chunk_read.wait()

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                return
            self.open_connections += 1
            self.accepted += 1
            self.peak = max(self.peak, self.open_connections)
            try:
                pipes = [
                    asyncio.create_task(self._pipe(reader, up_writer, "requests")),
                    asyncio.create_task(self._pipe(up_reader, writer, "replies")),
                ]
                try:
                    # Either side closing ends the link (Redis has no half-close).
                    await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for pipe in pipes:
                        pipe.cancel()
                    await asyncio.gather(*pipes, return_exceptions=True)
            finally:
                self.open_connections -= 1
        except asyncio.CancelledError:
            # Only stop() cancels a link, and the task ends here: asyncio logs a
            # client_connected_cb task that ends cancelled as an unhandled error.
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()
            self._links.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, side: str
    ) -> None:
        loop = asyncio.get_running_loop()
        delayed = self.direction in (side, "both")
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def feed() -> None:
            try:
                while chunk := await reader.read(65536):
                    self.chunks[side] += 1
                    self._chunk_read.set()
                    now = loop.time()
                    latency = self.latency if delayed else 0.0
                    if latency > 0 and 0 < self.split < len(chunk):
                        line.put_nowait((now, chunk[: self.split]))
                        line.put_nowait((now + latency, chunk[self.split :]))
                    else:
                        line.put_nowait((now + latency, chunk))
            except OSError:
                pass
            finally:
                line.put_nowait(None)

        feeder = asyncio.create_task(feed())
        holding = False  # a chunk taken from the line and not yet written
        try:
            while (item := await line.get()) is not None:
                holding = True
                due, chunk = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                holding = False
                await writer.drain()
        except OSError:
            pass
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            left = [line.get_nowait() for _ in range(line.qsize())]
            self.discarded += holding + sum(1 for item in left if item is not None)


async def fill_until_oom(client: Redis) -> None:
    """Fill a throwaway server (``noeviction``) until writes fail with OOM."""
    await client.config_set("maxmemory-policy", "noeviction")
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used + 2_000_000)
    # Big values first, then small ones: Redis counts the command being received,
    # so a big SET can be refused while a small write still fits.
    for size in (65536, 1024, 16):
        for i in range(2000):
            try:
                await client.set(f"filler:{size}:{i}", b"x" * size)
            except OutOfMemoryError:
                break
    for probe in (client.set("probe", "1"), client.hset("probe:h", "a", "1")):
        try:
            await probe
        except OutOfMemoryError:
            continue
        raise AssertionError("the server still accepts writes")


def http_scope(
    path: str = "/page",
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    server: tuple[str, int] = ("testserver", 80),
    client: tuple[str, int] = ("127.0.0.1", 1234),
) -> dict[str, Any]:
    """A raw ASGI HTTP GET scope, for requests an HTTP client would not send or
    apps driven message by message."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver")] if headers is None else headers,
        "server": server,
        "client": client,
    }


async def asgi_get(app: ASGIApp, scope: dict[str, Any]) -> tuple[Message, bytes]:
    """Run one request (no body) through ``app``: its start message and body."""
    messages: list[Message] = []
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start, body


class Opaque:
    """A third-party middleware that keeps its inner app under another name than
    ``.app``, where the cache's chain walk cannot follow it."""

    def __init__(self, app: ASGIApp) -> None:
        self._inner = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inner(scope, receive, send)
