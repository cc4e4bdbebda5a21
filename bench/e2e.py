"""End to end through uvicorn: one server process per tool on a free loopback port and
a small keep-alive HTTP/1.1 load generator in the bench process (bounded by a request
count and a time limit). Redis commands per request come from ``INFO commandstats``;
round trips cannot be counted in another process, so they are not reported here."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from redis.asyncio import Redis

from ._measure import Row, Scenario
from ._server import free_port
from ._traffic import commandstats

CONNECTIONS = 8
REQUESTS = 3000
TIME_LIMIT = 15.0
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
        status = int(status_line.split()[1])
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


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("uvicorn did not start")


async def _load(port: int, path: str, login: str | None) -> tuple[int, float, list[float], int]:
    conns = []
    for _ in range(CONNECTIONS):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = _Conn(reader, writer)
        if login:
            await conn.get(login)
        conns.append(conn)
    for conn in conns:  # warm-up
        for _ in range(20):
            await conn.get(path)
    left = [REQUESTS]
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + TIME_LIMIT

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
    elapsed = time.perf_counter() - start
    for conn in conns:
        conn.writer.close()
    return len(latencies), elapsed, latencies, errors[0]


def _spawn(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "--factory", "bench._e2e_app:make",
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


async def _one(
    url: str, admin: Redis, family: str, tool: str, label: str, path: str, login: str | None
) -> Row:
    row = Row(label, ours=tool == "ours", reference=tool in ("starlette-cookie", "no-cache"))
    port = free_port()
    env = {**os.environ, "BENCH_FAMILY": family, "BENCH_TOOL": tool, "BENCH_REDIS_URL": url}
    proc = _spawn(port, env)
    try:
        await asyncio.to_thread(_wait_port, port, proc)
        before = await commandstats(admin)
        done, elapsed, lat, errors = await asyncio.wait_for(
            _load(port, path, login), TIME_LIMIT + 30
        )
        after = await commandstats(admin)
        after.subtract(before)
        lat.sort()
        row.median_us = statistics.median(lat)
        row.p95_us = lat[int(len(lat) * 0.95)]
        row.rps = done / elapsed
        # Includes the warm-up and login requests, so divide by everything sent.
        sent = done + CONNECTIONS * (20 + (1 if login else 0))
        row.cmds = sum(v for v in after.values() if v > 0) / sent
        row.breakdown = ", ".join(f"{k} {v / sent:.2g}" for k, v in after.most_common() if v > 0)
        row.note = f"{done} requests over {CONNECTIONS} keep-alive connections"
        if errors:
            row.error = f"{errors} error responses"
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:160]
    finally:
        err = await asyncio.to_thread(_stop, proc)
        if row.error and err:
            row.error += " | " + err.decode(errors="replace").strip().splitlines()[-1][:120]
    return row


async def run(url: str, admin: Redis, only: str | None) -> tuple[list[Scenario], list[str]]:
    scenarios: list[Scenario] = []
    what = (
        f"uvicorn {_uvicorn_flavour()} (1 worker) on loopback; {CONNECTIONS} keep-alive "
        f"connections from an in-bench load generator, at most {REQUESTS} requests or "
        f"{TIME_LIMIT:.0f} s per tool, tools one after another. Latency is per request as "
        "seen by the client; the client and the server share the 2 cores."
    )
    if only in (None, "sessions"):
        rows = []
        for tool, label in (
            ("ours", "asgi_redis_kit"),
            ("starsessions", "starsessions 2.2 + RedisStore"),
            ("starlette-cookie", "starlette SessionMiddleware (cookie, no Redis)"),
        ):
            await admin.flushdb()
            rows.append(await _one(url, admin, "sessions", tool, label, "/visit", "/login"))
        scenarios.append(
            Scenario("e2e-sessions", "End to end: sessions read + write (GET /visit)", what, rows)
        )
    if only in (None, "cache"):
        rows = []
        for tool, label in (
            ("ours", "asgi_redis_kit"),
            ("fastapi-cache2", "fastapi-cache2 0.2 (RedisBackend)"),
            ("cashews", "cashews 7.6 (redis)"),
            ("aiocache", "aiocache 0.12 (RedisCache)"),
            ("no-cache", "no cache (FastAPI handler every time)"),
        ):
            await admin.flushdb()
            rows.append(await _one(url, admin, "cache", tool, label, "/json", None))
        scenarios.append(
            Scenario("e2e-cache", "End to end: cache hit on the JSON route (GET /json)", what, rows)
        )
    return scenarios, []
