"""End to end through uvicorn: one server process per tool on a free loopback port and
a small keep-alive HTTP/1.1 load generator in the bench process. All of a family's
servers run at once and the rounds interleave the tools, as in-process. Every round
is bounded by a request count and a time limit. Redis commands per request come from
``INFO commandstats``; round trips cannot be counted in another process, so they are
not reported here."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from ._measure import Row, Scenario
from ._server import free_port, wait_for_port
from ._traffic import HEARTBEAT, commandstats

CONNECTIONS = 8
ROUNDS = 6
PER_ROUND = 500
ROUND_LIMIT = 5.0  # seconds per tool per round, whatever PER_ROUND says
ROOT = Path(__file__).resolve().parent.parent


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.cookies: dict[str, str] = {}

    async def get(self, path: str) -> int:
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        head = f"GET {path} HTTP/1.1\r\nHost: bench.local\r\n"
        if cookie:
            head += f"Cookie: {cookie}\r\n"
        self.writer.write((head + "\r\n").encode())
        status_line = await self.reader.readline()
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            # The server closed the connection (b"") or framed a body we did not read.
            raise ConnectionError(f"bad status line {status_line[:60]!r}")
        status = int(parts[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "set-cookie":
                pair = value.split(";", 1)[0].strip()
                k, _, v = pair.partition("=")
                self.cookies[k] = v
        if length:
            await self.reader.readexactly(length)
        return status


def _uvicorn_flavour() -> str:
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"({http}, {loop} loop)"


def _spawn(factory: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """uvicorn serving ``factory`` (``module:function``) on a loopback ``port``."""
    return subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "--factory", factory,
            "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--log-level", "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return err or b""


async def _open(port: int, login: str | None) -> list[_Conn]:
    conns = []
    for _ in range(CONNECTIONS):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = _Conn(reader, writer)
        if login:
            await conn.get(login)
        conns.append(conn)
    return conns


async def _round(conns: list[_Conn], path: str, count: int) -> tuple[int, float, list[float], int]:
    left = [count]
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + ROUND_LIMIT

    async def worker(conn: _Conn) -> None:
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            t0 = time.perf_counter()
            status = await conn.get(path)
            latencies.append((time.perf_counter() - t0) * 1e6)
            if status >= 400:
                errors[0] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    return len(latencies), time.perf_counter() - start, latencies, errors[0]


@dataclass
class _Server:
    tool: str
    row: Row
    proc: subprocess.Popen[bytes]
    port: int
    conns: list[_Conn] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    done: int = 0
    errors: int = 0
    commands: Counter[str] = field(default_factory=Counter)


async def _family(
    url: str, admin: Redis, family: str, tools: list[tuple[str, str]], path: str, login: str | None
) -> list[Row]:
    await admin.flushdb()
    servers: list[_Server] = []
    try:
        for tool, label in tools:
            port = free_port()
            env = {**os.environ, "BENCH_FAMILY": family, "BENCH_TOOL": tool, "BENCH_REDIS_URL": url}
            row = Row(
                label, ours=tool == "ours", reference=tool in ("starlette-cookie", "no-cache")
            )
            servers.append(_Server(tool, row, _spawn("bench._e2e_app:make", port, env), port))
        live: list[_Server] = []
        for server in servers:
            try:
                await asyncio.to_thread(wait_for_port, server.port, server.proc)
                server.conns = await _open(server.port, login)
                await _round(server.conns, path, CONNECTIONS * 20)  # warm-up
                live.append(server)
            except Exception as exc:
                server.row.error = f"{type(exc).__name__}: {exc}"[:160]
        for r in range(ROUNDS):
            order = live[r % len(live) :] + live[: r % len(live)] if live else []
            for server in order:
                if server.row.error:
                    continue
                before = await commandstats(admin)
                try:
                    done, elapsed, lat, errors = await asyncio.wait_for(
                        _round(server.conns, path, PER_ROUND), ROUND_LIMIT + 30
                    )
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    # One server failing is reported on its row, never fatal.
                    server.row.error = f"round {r + 1}: {type(exc).__name__}: {exc}"[:160]
                    if server.proc.poll() is not None:
                        server.row.error += f" (uvicorn exited {server.proc.returncode})"
                    continue
                after = await commandstats(admin)
                after.subtract(before)
                after.pop(HEARTBEAT, None)  # trackers' and health checks' PINGs
                server.commands.update({k: v for k, v in after.items() if v > 0})
                server.done += done
                server.errors += errors
                server.latencies += lat
                server.rates.append(done / elapsed)
        for server in live:
            if server.row.error:
                continue
            row, lat = server.row, sorted(server.latencies)
            row.median_us = statistics.median(lat)
            row.p95_us = lat[int(len(lat) * 0.95)]
            row.rps = statistics.median(server.rates)
            row.cmds = sum(server.commands.values()) / server.done
            row.breakdown = ", ".join(
                f"{k} {v / server.done:.2g}" for k, v in server.commands.most_common()
            )
            row.note = f"{server.done} requests over {CONNECTIONS} keep-alive connections"
            if server.errors:
                row.error = f"{server.errors} error responses"
    finally:
        for server in servers:
            for conn in server.conns:
                conn.writer.close()
            err = await asyncio.to_thread(_stop, server.proc)
            if server.row.error and err:
                last = err.decode(errors="replace").strip().splitlines()[-1:]
                server.row.error += " | " + "".join(last)[:120]
    return [server.row for server in servers]


async def run(url: str, admin: Redis, only: str | None) -> tuple[list[Scenario], list[str]]:
    scenarios: list[Scenario] = []
    what = (
        f"uvicorn {_uvicorn_flavour()} (1 worker per tool, all running) on loopback; "
        f"{CONNECTIONS} keep-alive connections per tool from an in-bench load generator; "
        f"{ROUNDS} interleaved rounds of at most {PER_ROUND} requests or {ROUND_LIMIT:.0f} s "
        "per tool. Latency is per request as seen by the client; the client, the servers "
        "and Redis share the 2 cores, so these rows are the noisiest."
    )
    if only in (None, "sessions"):
        tools = [
            ("ours", "asgi_redis_kit"),
            ("ours-near", "asgi_redis_kit (near cache)"),
            ("starsessions", "starsessions 2.2 + RedisStore"),
            ("starlette-cookie", "starlette SessionMiddleware (cookie, no Redis)"),
        ]
        rows = await _family(url, admin, "sessions", tools, "/visit", "/login")
        title = "End to end: sessions read + write (GET /visit)"
        scenarios.append(Scenario("e2e-sessions", title, what, rows))
    if only in (None, "cache"):
        tools = [
            ("ours", "asgi_redis_kit"),
            ("ours-near", "asgi_redis_kit (near cache)"),
            ("fastapi-cache2", "fastapi-cache2 0.2 (RedisBackend)"),
            ("cashews", "cashews 7.6 (redis)"),
            ("aiocache", "aiocache 0.12 (RedisCache)"),
            ("no-cache", "no cache (FastAPI handler every time)"),
        ]
        rows = await _family(url, admin, "cache", tools, "/json", None)
        title = "End to end: cache hit on the JSON route (GET /json)"
        scenarios.append(Scenario("e2e-cache", title, what, rows))
    return scenarios, []
