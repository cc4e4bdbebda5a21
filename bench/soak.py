"""Soak: ``python -m bench soak [--minutes M] [--rps R] [--latency-ms L]``.

Checklist 39. One uvicorn process serves an app with both SessionMiddleware (a
visit counter with ``incr``, and session reads) and CacheMiddleware (a hot cached
route and a miss-heavy route with ever-new queries). Its Redis is the bench's own
``redis-server`` behind a DelayProxy (``tests/support.py``, no pytest needed) that
delays every reply by ``--latency-ms``. An open-loop httpx client in this process
sends ``--rps`` requests per second with at most ``--concurrency`` in flight, for
``--minutes`` minutes, and each minute records latency percentiles, errors, the
server's RSS and Redis's ``connected_clients`` and ``used_memory``.

Everything is on 127.0.0.1 and bounded: a request count (rps x seconds), a deadline
per minute, a timeout per request. redis-server, the proxy and uvicorn are stopped
on every exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path

import httpx
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_redis_kit import CacheMiddleware, Session, SessionMiddleware, cached
from tests.support import DelayProxy

from ._server import BenchRedis, free_port, redis_server_version, wait_for_port
from .e2e import _spawn, _stop, _uvicorn_flavour

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
USERS = 200  # distinct session cookies; a fixed set, so the number of sessions is flat
WARMUP = 15.0  # seconds of unrecorded traffic before minute 1
POOL = 64  # max_connections of each middleware's pool
# Share of each route in the traffic; /search always asks a query never seen before.
MIX = (("/visit", 0.40), ("/read", 0.20), ("/cached", 0.25), ("/search", 0.15))
# Tolerances of the verdict, fixed before any run.
RSS_TOLERANCE = 0.10  # last minute's RSS at most 10 % above the first's
CLIENTS_TOLERANCE = 10  # connected_clients of the last minute within +-10 of the first's
BUDGET_SLACK_MS = 100.0  # p99 budget = latency x round trips of the slowest route + this


# -- the app (runs in the uvicorn process) ------------------------------------------


def make_app() -> ASGIApp:
    """``uvicorn --factory bench.soak:make_app`` with SOAK_REDIS_URL set."""
    url = os.environ["SOAK_REDIS_URL"]
    payload = "x" * 2048

    async def visit(request: Request) -> Response:
        visits = await Session.of(request).incr("visits")
        return PlainTextResponse(f"Número de visitas: {visits}")

    async def read(request: Request) -> Response:
        return JSONResponse({"visits": request.session.get("visits", 0)})

    @cached(ttl=30)
    async def hot(request: Request) -> Response:
        return JSONResponse({"page": "hot", "payload": payload})

    @cached(ttl=10)
    async def search(request: Request) -> Response:
        return JSONResponse({"q": request.query_params.get("q", ""), "payload": payload[:512]})

    app = Starlette(
        routes=[
            Route("/visit", visit),
            Route("/read", read),
            Route("/cached", hot),
            Route("/search", search),
        ],
        middleware=[
            # Outside the sessions, so hits are served before a session loads.
            Middleware(CacheMiddleware, redis=url, key_prefix="soak:c:", max_connections=POOL),
            Middleware(
                SessionMiddleware,
                secret_key="soak-secret",
                redis=url,
                key_prefix="soak:s:",
                max_connections=POOL,
            ),
        ],
    )
    return _ServerTiming(app)


class _ServerTiming:
    """Adds ``Server-Timing: app;dur=<ms>`` (time until the response starts, inside
    uvicorn), so the report can tell the server's latency from the client's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - started) * 1000
                MutableHeaders(scope=message).append("server-timing", f"app;dur={took:.2f}")
            await send(message)

        await self.app(scope, receive, timed)


# -- the proxy, in a process of its own --------------------------------------------


async def _serve_proxy(upstream_port: int, latency: float) -> None:
    """The proxy process: prints its port, then answers each line on stdin with its
    counters as JSON, and stops at EOF (so it also stops if the bench dies)."""
    proxy = DelayProxy(upstream_port, latency=latency)
    await proxy.start()
    print(proxy.port, flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        while await stdin.readline():
            stats = {"requests": proxy.chunks["requests"], "open": proxy.open_connections}
            print(json.dumps(stats), flush=True)
    finally:
        await proxy.stop()


class ProxyProcess:
    """A DelayProxy in its own Python process, so neither the load generator nor the
    proxy delays the other (they would share one GIL in threads, or one loop)."""

    def __init__(self, upstream_port: int, latency: float) -> None:
        self.args = [
            sys.executable,
            "-m",
            "bench.soak",
            "--proxy",
            str(upstream_port),
            repr(latency),
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> ProxyProcess:
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the port, or EOF if it failed to start
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError("the delay proxy did not start")
        self.port = int(line)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """The proxy's counters: ``requests`` (round trips so far) and ``open``."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        stats: dict[str, int] = json.loads(self.proc.stdout.readline())
        return stats

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin:
            proc.stdin.close()  # EOF: the proxy stops by itself
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


# -- the load generator ------------------------------------------------------------


@dataclass
class Minute:
    index: int
    latencies: list[float] = field(default_factory=list)  # ms, completed requests
    server: list[float] = field(default_factory=list)  # ms inside uvicorn (Server-Timing)
    lag: float = 0.0  # ms, the client loop's worst lateness in the minute
    by_route: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    late: int = 0  # requests that waited for a free concurrency slot
    rss_kib: int = 0
    clients: int = 0
    used_memory: int = 0
    proxy_open: int = 0
    server_cpu: float = 0.0  # CPU seconds of the uvicorn process so far
    bench_cpu: float = 0.0  # CPU seconds of this process (the client) so far
    load: float = 0.0  # the machine's 1-minute load average


@dataclass
class Soak:
    args: argparse.Namespace
    port: int
    admin: Redis
    server_pid: int
    proxy: ProxyProcess
    users: list[dict[str, str]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(39))
    round_trips: dict[str, float] = field(default_factory=dict)
    start_sample: Minute = field(default_factory=lambda: Minute(0))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # utime and stime, fields 14 and 15 of proc(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _sample(soak: Soak, minute: Minute) -> None:
    minute.rss_kib = _rss_kib(soak.server_pid)
    minute.server_cpu = _cpu_seconds(soak.server_pid)
    minute.bench_cpu = time.process_time()
    minute.load = os.getloadavg()[0]
    info = await soak.admin.info()
    minute.clients = int(info["connected_clients"])
    minute.used_memory = int(info["used_memory"])
    minute.proxy_open = (await asyncio.to_thread(soak.proxy.stats))["open"]


def _cookie_header(jar: dict[str, str]) -> dict[str, str]:
    return {"cookie": "; ".join(f"{k}={v}" for k, v in jar.items())} if jar else {}


def _keep_cookies(jar: dict[str, str], response: httpx.Response) -> None:
    for raw in response.headers.get_list("set-cookie"):
        name, _, value = raw.split(";", 1)[0].strip().partition("=")
        if "max-age=0" in raw.lower().replace(" ", "") or not value:
            jar.pop(name, None)
        else:
            jar[name] = value


def _pick(soak: Soak) -> tuple[str, str, dict[str, str] | None]:
    """(route, url, the user's cookie jar or None for an anonymous request)."""
    x = soak.rng.random()
    route = MIX[-1][0]
    for name, share in MIX:
        x -= share
        if x < 0:
            route = name
            break
    if route == "/search":
        return route, f"/search?q={uuid.uuid4().hex[:12]}", None
    if route == "/cached":
        # Anonymous, as a crawler or a first visit: a cookie would bypass the cache.
        return route, "/cached", None
    return route, route, soak.rng.choice(soak.users)


async def _one(
    client: httpx.AsyncClient, soak: Soak, route: str, url: str, jar: dict[str, str] | None
) -> tuple[float, float | None, str | None]:
    """Latency in ms as the client saw it, as the server saw it (None on a failure),
    and an error label (None when the answer is a 2xx/3xx)."""
    started = time.perf_counter()
    try:
        response = await client.get(url, headers=_cookie_header(jar) if jar is not None else {})
    except httpx.HTTPError as exc:
        return (time.perf_counter() - started) * 1000, None, type(exc).__name__
    elapsed = (time.perf_counter() - started) * 1000
    if jar is not None:
        _keep_cookies(jar, response)
    timing = response.headers.get("server-timing", "")
    server = float(timing.partition("dur=")[2]) if "dur=" in timing else None
    return elapsed, server, (str(response.status_code) if response.status_code >= 400 else None)


async def _watch_lag(minutes: list[Minute], t0: float) -> None:
    """How late a 10 ms sleep of the client's loop wakes up: a loop (or a machine)
    too busy to read replies on time shows here, not in the server's numbers."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(0.01)
        now = loop.time()
        minute = minutes[min(int((now - t0) // 60), len(minutes) - 1)]
        minute.lag = max(minute.lag, (now - before - 0.01) * 1000)


async def _drive(
    clients: list[httpx.AsyncClient], soak: Soak, seconds: float, record: list[Minute] | None
) -> None:
    """Send ``rps x seconds`` requests on an open-loop schedule, at most
    ``concurrency`` in flight; with ``record``, file each under the minute it
    started in and sample the server at each minute's end."""
    rps, limit = soak.args.rps, soak.args.concurrency
    total = int(rps * seconds)
    # A slot is a client connection: slot k always uses client k % len(clients), so
    # no client's pool ever has more requests than connections.
    free: asyncio.Queue[int] = asyncio.Queue()
    for slot in range(limit):
        free.put_nowait(slot)
    tasks: set[asyncio.Task[None]] = set()
    samplers: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def request(slot: int, minute: Minute | None) -> None:
        try:
            route, url, jar = _pick(soak)
            client = clients[slot % len(clients)]
            latency, server, error = await _one(client, soak, route, url, jar)
            if minute is not None:
                minute.latencies.append(latency)
                if server is not None:
                    minute.server.append(server)
                minute.by_route.setdefault(route, []).append(latency)
                if error:
                    minute.errors[error] += 1
        finally:
            free.put_nowait(slot)

    if record is not None:

        async def sample_at(minute: Minute) -> None:
            await asyncio.sleep(max(0.0, t0 + 60 * minute.index - loop.time()))
            await _sample(soak, minute)

        samplers = [asyncio.create_task(sample_at(m)) for m in record]
        watcher = asyncio.create_task(_watch_lag(record, t0))
    for i in range(total):
        due = t0 + i / rps
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        minute = record[min(int((loop.time() - t0) // 60), len(record) - 1)] if record else None
        if free.empty() and minute is not None:
            minute.late += 1
        slot = await free.get()
        if minute is not None:
            minute.sent += 1
        task = asyncio.create_task(request(slot, minute))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    # Every request has its own timeout; this only bounds the tail.
    if tasks:
        await asyncio.wait(list(tasks), timeout=60)
    if samplers:
        await asyncio.wait(samplers, timeout=120)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def _measure_round_trips(client: httpx.AsyncClient, soak: Soak) -> None:
    """Round trips per route, one request at a time: Redis commands (or pipelines)
    the proxy saw arrive, per request. Each costs one injected latency."""
    jar = soak.users[0]
    await client.get("/cached")  # make sure the hot entry exists
    for route in ("/visit", "/read", "/cached", "/search"):
        before = soak.proxy.stats()["requests"]
        n = 10
        for _ in range(n):
            url = f"/search?q={uuid.uuid4().hex[:12]}" if route == "/search" else route
            cookies = _cookie_header(jar) if route in ("/visit", "/read") else {}
            response = await client.get(url, headers=cookies)
            response.raise_for_status()
        soak.round_trips[route] = (soak.proxy.stats()["requests"] - before) / n


async def _run(
    args: argparse.Namespace,
    soak_port: int,
    redis: BenchRedis,
    proxy: ProxyProcess,
    server_pid: int,
) -> tuple[list[Minute], Soak]:
    admin = Redis(host="127.0.0.1", port=redis.port)
    soak = Soak(args, soak_port, admin, server_pid, proxy)
    # Refuse every cookie at the client level: each simulated user keeps its own jar.
    no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    # Several small clients: httpcore's pool does work quadratic in the requests it
    # holds, which at 64 in flight costs more CPU than the server under test.
    per_client = 8
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    clients = [
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{soak_port}",
            limits=limits,
            timeout=10.0,
            cookies=no_cookies,
        )
        for _ in range(-(-args.concurrency // per_client))
    ]
    try:
        for _ in range(USERS):
            jar: dict[str, str] = {}
            _keep_cookies(jar, (await clients[0].get("/visit")))
            if "session" not in jar:
                raise RuntimeError("the soak app did not set a session cookie")
            soak.users.append(jar)
        await _measure_round_trips(clients[0], soak)
        print(f"soak: round trips per request {soak.round_trips}", file=sys.stderr)
        await _drive(clients, soak, WARMUP, None)
        await _sample(soak, soak.start_sample)
        minutes = [Minute(i + 1) for i in range(args.minutes)]
        started = time.monotonic()

        async def progress() -> None:
            for m in minutes:
                await asyncio.sleep(max(0.0, started + 60 * m.index + 1 - time.monotonic()))
                print(
                    f"soak: minute {m.index}/{args.minutes}: {len(m.latencies)} done, "
                    f"{sum(m.errors.values())} errors, p99 {_pct(m.latencies, 0.99):.0f} ms, "
                    f"rss {m.rss_kib / 1024:.1f} MiB, clients {m.clients}",
                    file=sys.stderr,
                )

        reporter = asyncio.create_task(progress())
        try:
            await _drive(clients, soak, 60.0 * args.minutes, minutes)
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        return minutes, soak
    finally:
        for client in clients:
            await client.aclose()
        await admin.aclose()


# -- the report --------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render(minutes: list[Minute], soak: Soak, took: float) -> str:
    args = soak.args
    latency_ms = args.latency_ms
    max_rt = max(soak.round_trips.values())
    budget = latency_ms * max_rt + BUDGET_SLACK_MS
    first, last = minutes[0], minutes[-1]
    errors = sum((m.errors for m in minutes), Counter[str]())
    p99s = [_pct(m.server, 0.99) for m in minutes]
    within = all(p <= budget for p in p99s)
    client_p99s = [_pct(m.latencies, 0.99) for m in minutes]
    client_within = sum(p <= budget for p in client_p99s)
    rss_ok = last.rss_kib <= first.rss_kib * (1 + RSS_TOLERANCE)
    clients_ok = abs(last.clients - first.clients) <= CLIENTS_TOLERANCE
    cap = 2 * POOL + 1
    cap_ok = all(m.clients <= cap for m in minutes)
    ok = within and rss_ok and clients_ok and cap_ok and not errors
    lines = [
        f"# Soak: {args.minutes} min at {args.rps:g} req/s, "
        f"{latency_ms:g} ms injected Redis latency",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, took {took / 60:.1f} min "
        f"in all. `python -m bench soak --minutes {args.minutes} --rps {args.rps:g} "
        f"--latency-ms {latency_ms:g} --concurrency {args.concurrency}`.",
        "",
        f"- Server: one uvicorn {_uvicorn_flavour()} process on loopback, Starlette app with "
        f"CacheMiddleware outside SessionMiddleware, each with a pool of {POOL} connections "
        "(`max_connections`), default timeouts (sessions 1 s, cache 0.5 s).",
        f"- Redis: redis-server {redis_server_version()} on loopback behind a DelayProxy "
        f"(tests/support.py, in a process of its own) that "
        f"delays every reply by {latency_ms:g} ms, so each round trip costs {latency_ms:g} ms.",
        f"- Client: httpx in the bench process, open loop at {args.rps:g} req/s, at most "
        f"{args.concurrency} requests in flight; {USERS} users with their own session cookies; "
        f"{WARMUP:g} s of unrecorded warm-up. Mix: "
        + ", ".join(f"{r} {s:.0%}" for r, s in MIX)
        + " (`/visit` = `Session.incr`, `/read` = session read, `/cached` = hit on an "
        "anonymous cached route, `/search` = a query never seen before: miss + store).",
        "- Latency is client-side, from sending the request to the end of the response. "
        "Client, server, proxy and Redis share the machine's "
        f"{os.cpu_count()} cores, and so do other tenants' jobs. *server p99* is the time "
        "inside uvicorn until the response starts (a `Server-Timing` header), so it leaves "
        "out the client and HTTP. *server CPU* and *client CPU* are the share of one core "
        "used by uvicorn and by the client in the minute; *client loop lag* is the worst "
        "lateness of a 10 ms sleep in the client (a busy machine shows there); "
        "*load avg* is the machine's 1-minute load average at the minute's end "
        f'({os.cpu_count()} = all cores busy). A "late start" waited for one of the '
        f"{args.concurrency} in-flight slots.",
        "- Round trips per request, measured through the proxy one request at a time: "
        + ", ".join(f"{r} {v:.1f}" for r, v in soak.round_trips.items())
        + ".",
        "",
        "| minute | sent | done | late starts | p50 ms | p95 ms | p99 ms | max ms "
        "| server p99 ms | errors | server RSS MiB | connected_clients | pool conns (proxy) "
        "| used_memory MiB | server CPU | client CPU | client loop lag ms | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    s = soak.start_sample
    lines.append(
        f"| start | | | | | | | | | | {s.rss_kib / 1024:.1f} | {s.clients} | {s.proxy_open} "
        f"| {s.used_memory / 2**20:.2f} | | | | {s.load:.1f} |"
    )
    previous = s
    for m in minutes:
        err = ", ".join(f"{k}: {v}" for k, v in sorted(m.errors.items())) or "0"
        lines.append(
            f"| {m.index} | {m.sent} | {len(m.latencies)} | {m.late} "
            f"| {_pct(m.latencies, 0.5):.1f} | {_pct(m.latencies, 0.95):.1f} "
            f"| {_pct(m.latencies, 0.99):.1f} | {max(m.latencies, default=float('nan')):.1f} "
            f"| {_pct(m.server, 0.99):.1f} | {err} | {m.rss_kib / 1024:.1f} | {m.clients} "
            f"| {m.proxy_open} "
            f"| {m.used_memory / 2**20:.2f} "
            f"| {(m.server_cpu - previous.server_cpu) / 60:.0%} "
            f"| {(m.bench_cpu - previous.bench_cpu) / 60:.0%} | {m.lag:.0f} | {m.load:.1f} |"
        )
        previous = m
    lines += ["", "Per route over the whole run (client-side ms):", ""]
    lines += [
        "| route | requests | round trips | p50 | p95 | p99 | budget |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for route, _ in MIX:
        values = [v for m in minutes for v in m.by_route.get(route, [])]
        rt = soak.round_trips.get(route, 0.0)
        lines.append(
            f"| {route} | {len(values)} | {rt:.1f} | {_pct(values, 0.5):.1f} "
            f"| {_pct(values, 0.95):.1f} | {_pct(values, 0.99):.1f} "
            f"| {latency_ms * rt + BUDGET_SLACK_MS:.0f} |"
        )
    total = sum(len(m.latencies) for m in minutes)
    lines += [
        "",
        f"Budget: server p99 <= {latency_ms:g} ms x {max_rt:.1f} round trips (the slowest "
        f"route) + {BUDGET_SLACK_MS:g} ms = {budget:.0f} ms, in every minute. The verdict "
        "takes the server's p99 because the load generator shares the 2 cores with the server "
        "and with other tenants' jobs: when its own loop stalls (the *client loop lag* "
        "column) every reply it is waiting for looks late, however fast the server was. "
        "The client-side p99 is reported beside it. Flat: the last minute's "
        f"server RSS at most {RSS_TOLERANCE:.0%} above the first minute's, its "
        f"`connected_clients` within +-{CLIENTS_TOLERANCE} of the first's and never above "
        f"{cap} (two pools of {POOL} plus the bench's own INFO connection); no errors.",
        "",
        f"**Verdict: {'PASS' if ok else 'FAIL'}** - server p99 {min(p99s):.0f}-{max(p99s):.0f} "
        f"ms per minute (budget {budget:.0f} ms: {'within' if within else 'OVER'}; client-side "
        f"p99 {min(client_p99s):.0f}-{max(client_p99s):.0f} ms, within budget in "
        f"{client_within} of {len(minutes)} minutes); RSS "
        f"{first.rss_kib / 1024:.1f} -> {last.rss_kib / 1024:.1f} MiB "
        f"({'flat' if rss_ok else 'GREW'}); connected_clients {first.clients} -> "
        f"{last.clients} ({'flat' if clients_ok and cap_ok else 'NOT FLAT'}); "
        f"used_memory {first.used_memory / 2**20:.2f} -> {last.used_memory / 2**20:.2f} MiB; "
        f"errors {sum(errors.values())} of {total} requests"
        + (f" ({', '.join(f'{k}: {v}' for k, v in errors.items())})" if errors else "")
        + ".",
    ]
    return "\n".join(lines)


# -- entry point -------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench soak",
        description="Serve the app under a steady load with injected Redis latency; write "
        "bench/results/soak-<minutes>m.md.",
    )
    p.add_argument("--minutes", type=int, default=2, help="recorded minutes (default 2)")
    p.add_argument("--rps", type=float, default=100.0, help="target requests/s (default 100)")
    p.add_argument(
        "--latency-ms", type=float, default=50.0, help="injected Redis latency in ms (default 50)"
    )
    p.add_argument(
        "--concurrency", type=int, default=64, help="max requests in flight (default 64)"
    )
    p.add_argument("--out", type=Path, help="default: bench/results/soak-<minutes>m.md")
    args = p.parse_args(argv)
    if not (1 <= args.minutes <= 180 and 0 < args.rps <= 2000 and 1 <= args.concurrency <= 512):
        p.error("need 1 <= minutes <= 180, 0 < rps <= 2000, 1 <= concurrency <= 512")
    if not 0 <= args.latency_ms <= 1000:
        p.error("need 0 <= latency-ms <= 1000")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
    out: Path = args.out or RESULTS / f"soak-{args.minutes}m.md"
    started = time.monotonic()
    server: subprocess.Popen[bytes] | None = None
    try:
        with BenchRedis() as redis, ProxyProcess(redis.port, args.latency_ms / 1000) as proxy:
            try:
                port = free_port()
                env = {**os.environ, "SOAK_REDIS_URL": proxy.url}
                server = _spawn("bench.soak:make_app", port, env)
                wait_for_port(port, server)
                minutes, soak = asyncio.run(_run(args, port, redis, proxy, server.pid))
                if server.poll() is not None:
                    raise RuntimeError(f"uvicorn exited with {server.returncode} during the soak")
            finally:
                if server is not None:
                    err = _stop(server)
                    if err.strip():
                        print(err.decode(errors="replace")[-2000:], file=sys.stderr)
    except KeyboardInterrupt:
        print("soak: interrupted; servers stopped, nothing written", file=sys.stderr)
        return 130
    text = render(minutes, soak, time.monotonic() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    print(f"\nsoak: wrote {out}", file=sys.stderr)
    return 0


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--proxy"]:
        # The proxy process (see ProxyProcess); Ctrl-C reaches the whole group, and
        # the parent closing our stdin is the normal way out.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        asyncio.run(_serve_proxy(int(sys.argv[2]), float(sys.argv[3])))
        sys.exit(0)
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.exit(main(sys.argv[1:]))
