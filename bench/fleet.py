"""``python -m bench fleet``: what Redis pays to keep a fleet of near caches coherent.

A throwaway ``redis-server`` (loopback, nothing on disk), N tracking clients standing
in for N app instances, and one writer doing W session-sized writes/s (HSET of a
~300-byte hash + PEXPIRE) under one prefix, for a bounded number of seconds. Three
phases on the same keys:

1. no tracking: the writer alone (the cost of the writes themselves);
2. BCAST: each client is one raw RESP2 connection doing ``CLIENT TRACKING ON
   REDIRECT <own id> BCAST PREFIX <p>`` and ``SUBSCRIBE __redis__:invalidate``, the
   near cache's one tracking connection per node;
3. default tracking (no BCAST): each client has a subscriber connection and a data
   connection tracking into it, and has read every key once (the per-key tracking
   table Redis keeps for it).

Measured per phase: invalidation messages, keys and bytes received per client and in
total per second, Redis ``used_memory`` (peak while writing) and Redis CPU
(``used_cpu_sys + used_cpu_user`` delta per second). The box this runs on is small,
so the run is scaled down and the report extrapolates linearly to the production
shape, saying so. Every loop is bounded by a deadline; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._report import load
from ._server import BenchRedis, redis_server_version

RESULTS = Path(__file__).parent / "results"
CHANNEL = b"__redis__:invalidate"
# The production shape the scaled-down run is extrapolated to.
TARGET_CLIENTS = 50
TARGET_WRITES = 10_000
TICK = 0.01  # the writer sends one pipelined batch per tick
SESSION_TTL_MS = 1_800_000


def _resp(*args: bytes | str | int) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def session_fields() -> list[bytes]:
    """A ~300-byte session hash: what our SessionMiddleware stores for a logged-in user."""
    fields = {
        "user_id": "184467",
        "csrf": "tq8Zr1Jm0c3n4Yw7Kf2bPzXhV9sLdE5a",
        "cart": '[{"sku":"W-1001","qty":2},{"sku":"G-2040","qty":1},{"sku":"B-3310","qty":4}]',
        "flash": '["Your order was saved."]',
        "locale": "en-GB",
        "created": "1764628800.123",
        "last_seen": "1764630012.456",
        "theme": "dark",
        "visits": "17",
        "referrer": "https://shop.example.com/catalogue?page=3&sort=price",
    }
    out: list[bytes] = []
    for k, v in fields.items():
        out += [k.encode(), v.encode()]
    return out


def write_command(key: bytes, fields: list[bytes]) -> bytes:
    return _resp(b"HSET", key, *fields) + _resp(b"PEXPIRE", key, SESSION_TTL_MS)


@dataclass
class Tally:
    """What one tracking client received. Counting is by byte pattern over the raw
    stream (a tail is kept across reads so no pattern is split): the channel name
    only occurs in the pushes, and every key starts with the prefix."""

    messages: int = 0
    keys: int = 0
    bytes: int = 0
    closed_early: bool = False


async def _line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 10)


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    writer.write(_resp(b"CLIENT", b"ID"))
    await writer.drain()
    reply = await _line(reader)
    if not reply.startswith(b":"):
        raise RuntimeError(f"CLIENT ID answered {reply!r}")
    return reader, writer, int(reply[1:])


async def _expect_ok(reader: asyncio.StreamReader, what: str) -> None:
    reply = await _line(reader)
    if reply != b"+OK\r\n":
        raise RuntimeError(f"{what} answered {reply!r}")


async def _subscribe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(_resp(b"SUBSCRIBE", CHANNEL))
    await writer.drain()
    # *3 $9 subscribe $20 __redis__:invalidate :1 -> the last line is ":1"
    await asyncio.wait_for(reader.readuntil(b":1\r\n"), 10)


async def _listen(
    reader: asyncio.StreamReader, tally: Tally, prefix: bytes, stop: asyncio.Event
) -> None:
    message, key = b"\r\n" + CHANNEL + b"\r\n", b"\r\n" + prefix
    keep = max(len(message), len(key)) - 1
    tail = b""
    while not stop.is_set():
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 16), 0.2)
        except TimeoutError:
            continue
        if not chunk:
            tally.closed_early = True  # Redis dropped us (output buffer limit?)
            return
        tally.bytes += len(chunk)
        data = tail + chunk
        # A pattern lying wholly inside the kept tail was counted last time.
        tally.messages += data.count(message) - tail.count(message)
        tally.keys += data.count(key) - tail.count(key)
        tail = data[-keep:]


@dataclass
class Fleet:
    """The tracking clients of one phase and their listening tasks."""

    tallies: list[Tally] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def close(self) -> None:
        self.stop.set()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        for w in self.writers:
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 2)


async def _bcast_fleet(port: int, clients: int, prefix: bytes) -> Fleet:
    fleet = Fleet()
    for _ in range(clients):
        reader, writer, cid = await _open(port)
        fleet.writers.append(writer)
        writer.write(
            _resp(b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", cid, b"BCAST", b"PREFIX", prefix)
        )
        await writer.drain()
        await _expect_ok(reader, "CLIENT TRACKING BCAST")
        await _subscribe(reader, writer)
        tally = Tally()
        fleet.tallies.append(tally)
        fleet.tasks.append(asyncio.create_task(_listen(reader, tally, prefix, fleet.stop)))
    return fleet


async def _default_fleet(
    port: int, clients: int, prefix: bytes, keys: list[bytes], fields: list[bytes]
) -> Fleet:
    """Per client: a subscriber connection and a data connection tracking into it,
    which reads every key once (HLEN: a read-only command, so Redis tracks the key)."""
    fleet = Fleet()
    reads = b"".join(_resp(b"HLEN", k) for k in keys)
    for _ in range(clients):
        sub_reader, sub_writer, sub_id = await _open(port)
        fleet.writers.append(sub_writer)
        await _subscribe(sub_reader, sub_writer)
        data_reader, data_writer, _ = await _open(port)
        fleet.writers.append(data_writer)
        data_writer.write(_resp(b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", sub_id))
        await data_writer.drain()
        await _expect_ok(data_reader, "CLIENT TRACKING")
        data_writer.write(reads)
        await data_writer.drain()
        # Every key holds the same 9-field hash: one ":9" line per HLEN.
        expected = b":%d\r\n" % (len(fields) // 2) * len(keys)
        got = await asyncio.wait_for(data_reader.readexactly(len(expected)), 60)
        if got != expected:
            raise RuntimeError(f"HLEN answered {got[:40]!r}...")
        tally = Tally()
        fleet.tallies.append(tally)
        fleet.tasks.append(asyncio.create_task(_listen(sub_reader, tally, prefix, fleet.stop)))
    return fleet


class Admin:
    """A raw connection for INFO (no client library between us and the numbers)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Admin:
        reader, writer, _ = await _open(port)
        return cls(reader, writer)

    async def command(self, *args: bytes | str | int) -> bytes:
        self.writer.write(_resp(*args))
        await self.writer.drain()
        head = await _line(self.reader)
        if head.startswith(b"$"):
            size = int(head[1:])
            body = await asyncio.wait_for(self.reader.readexactly(size + 2), 10)
            return body[:-2]
        if head.startswith(b"-"):
            raise RuntimeError(head.decode().strip())
        return head.strip()

    async def info(self, section: str = "everything") -> dict[str, str]:
        text = (await self.command(b"INFO", section)).decode()
        out = {}
        for line in text.splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                out[k] = v
        return out

    async def cpu(self) -> float:
        info = await self.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def close(self) -> None:
        self.writer.close()


async def _fill(port: int, keys: list[bytes], fields: list[bytes]) -> None:
    reader, writer, _ = await _open(port)
    try:
        batch = 500
        for i in range(0, len(keys), batch):
            part = keys[i : i + batch]
            writer.write(b"".join(write_command(k, fields) for k in part))
            await writer.drain()
            for _ in range(2 * len(part)):
                await _line(reader)
    finally:
        writer.close()


@dataclass
class Phase:
    name: str
    clients: int
    seconds: float = 0.0
    writes: int = 0
    redis_cpu: float = 0.0  # seconds of Redis CPU over the write window
    memory_before: int = 0  # used_memory before the clients connected
    memory_clients: int = 0  # after they connected (and read, in default mode)
    memory_peak: int = 0  # highest used_memory sampled while writing
    tracking: dict[str, int] = field(default_factory=dict)
    tallies: list[Tally] = field(default_factory=list)
    writer_behind: bool = False
    bench_cpu: float = 0.0  # this process (writer + clients) over the write window

    @property
    def rate(self) -> float:
        return self.writes / self.seconds if self.seconds else 0.0

    def total(self, what: str) -> int:
        return sum(int(getattr(t, what)) for t in self.tallies)


async def _replies(reader: asyncio.StreamReader, count: int) -> None:
    """Consume ``count`` one-line integer replies (HSET, PEXPIRE) in bulk: reading
    them line by line made the writer the first thing to fall behind."""
    seen, last = 0, b""
    while seen < count:
        chunk = await asyncio.wait_for(reader.read(1 << 16), 10)
        if not chunk:
            raise RuntimeError("redis-server closed the writer's connection")
        if b"-" in chunk:
            raise RuntimeError(f"a write answered an error: {chunk[:80]!r}")
        # A "\r\n" split over two reads is counted once, in the read that ends it.
        seen += (last + chunk).count(b"\r\n") - last.count(b"\r\n")
        last = chunk[-1:]


async def _write_for(
    port: int, keys: list[bytes], fields: list[bytes], rate: int, seconds: float, admin: Admin
) -> tuple[int, float, int, bool]:
    """Write ``rate`` sessions/s for ``seconds``, cycling over ``keys``. Returns writes
    done, the elapsed time, the peak used_memory sampled every 0.25 s, and whether
    the writer fell behind its schedule (the box could not keep up)."""
    reader, writer, _ = await _open(port)
    per_tick = max(1, round(rate * TICK))
    done, peak, next_sample = 0, 0, 0.0
    start = time.monotonic()
    deadline = start + seconds
    try:
        while (now := time.monotonic()) < deadline:
            due = min(int((now - start) * rate) + per_tick, int(seconds * rate))
            if due > done:
                batch = [keys[(done + i) % len(keys)] for i in range(due - done)]
                writer.write(b"".join(write_command(k, fields) for k in batch))
                await writer.drain()
                await _replies(reader, 2 * len(batch))
                done = due
            if now >= next_sample:
                peak = max(peak, int((await admin.info("memory"))["used_memory"]))
                next_sample = now + 0.25
            await asyncio.sleep(max(0.0, start + (done / rate) - time.monotonic()))
        elapsed = time.monotonic() - start
    finally:
        writer.close()
    behind = done < 0.95 * rate * seconds
    return done, elapsed, peak, behind


async def _phase(
    name: str,
    port: int,
    admin: Admin,
    keys: list[bytes],
    fields: list[bytes],
    args: argparse.Namespace,
    prefix: bytes,
) -> Phase:
    clients = 0 if name == "no tracking" else args.clients
    phase = Phase(name, clients)
    phase.memory_before = int((await admin.info())["used_memory"])
    fleet = Fleet()
    try:
        if name == "BCAST":
            fleet = await _bcast_fleet(port, clients, prefix)
        elif name == "default":
            fleet = await _default_fleet(port, clients, prefix, keys, fields)
        await asyncio.sleep(0.3)  # let the connections settle before measuring
        info = await admin.info()
        phase.memory_clients = int(info["used_memory"])
        phase.tracking = {
            k: int(info[k])
            for k in ("tracking_total_keys", "tracking_total_items", "tracking_total_prefixes")
            if k in info
        }
        cpu0, own0 = await admin.cpu(), time.process_time()
        phase.writes, phase.seconds, phase.memory_peak, phase.writer_behind = await _write_for(
            port, keys, fields, args.writes, args.seconds, admin
        )
        # Drain what Redis still has queued for the clients, then read its CPU.
        await asyncio.sleep(0.5)
        phase.redis_cpu = await admin.cpu() - cpu0
        phase.bench_cpu = time.process_time() - own0
        phase.tallies = fleet.tallies
    finally:
        await fleet.close()
    await asyncio.sleep(0.3)
    return phase


async def run(port: int, args: argparse.Namespace) -> list[Phase]:
    prefix = b"fleet:s:"
    # Enough keys that each is written once per run: in default mode every write
    # then hits a key every client has read (the worst case: every instance has
    # served every session).
    count = max(1, int(args.writes * args.seconds))
    keys = [prefix + b"%08d" % i for i in range(count)]
    fields = session_fields()
    await _fill(port, keys, fields)
    admin = await Admin.open(port)
    phases = []
    try:
        for name in ("no tracking", "BCAST", "default"):
            print(f"fleet: phase {name} ...", file=sys.stderr)
            phases.append(await _phase(name, port, admin, keys, fields, args, prefix))
    finally:
        admin.close()
    return phases


def _mb(n: float) -> str:
    return f"{n / 1_048_576:,.1f} MB"


def render(phases: list[Phase], args: argparse.Namespace, value_bytes: int) -> str:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    base = phases[0]
    scale = (TARGET_CLIENTS * TARGET_WRITES) / (args.clients * args.writes)
    lines = [
        "# Fleet: the cost of near-cache invalidation on Redis",
        "",
        f"- Date: {now}; nproc={nproc} (load average {load()}); "
        f"Python {platform.python_version()}; "
        f"redis-server {redis_server_version()} (the bench's own, loopback)",
        f"- Run: {args.clients} tracking clients, writer target {args.writes:,} writes/s "
        f"for {args.seconds:g} s; each write is HSET of a {value_bytes}-byte session hash "
        f"({len(session_fields()) // 2} fields) + PEXPIRE, one key per write, "
        f"{int(args.writes * args.seconds):,} keys, each written once per phase",
        "- `python -m bench fleet` (bench/fleet.py). Clients are raw RESP2 connections in "
        "the bench process; they count what they receive and do nothing else.",
        "",
        "| phase | clients | writes/s done | invalidation msgs/s (total) | keys/s (total) "
        "| bytes/s per client | bytes/s (total) | Redis CPU (cores) | extra CPU vs no tracking "
        "| used_memory before clients -> with clients -> peak | tracking table |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in phases:
        secs = p.seconds or 1.0
        per_client = p.total("bytes") / secs / p.clients if p.clients else 0.0
        cpu = p.redis_cpu / secs
        extra = cpu - base.redis_cpu / (base.seconds or 1.0)
        table = ", ".join(
            f"{k.removeprefix('tracking_total_')} {v:,}" for k, v in p.tracking.items()
        )
        name = {
            "no tracking": "no tracking (writer only)",
            "BCAST": "BCAST PREFIX, 1 connection per client",
            "default": "default tracking, every client read every key",
        }[p.name]
        if p.writer_behind:
            name += " (writer fell behind)"
        dropped = sum(t.closed_early for t in p.tallies)
        if dropped:
            name += f" ({dropped} clients dropped by Redis)"
        lines.append(
            f"| {name} | {p.clients} | {p.rate:,.0f} | {p.total('messages') / secs:,.0f} "
            f"| {p.total('keys') / secs:,.0f} | {per_client:,.0f} "
            f"| {p.total('bytes') / secs:,.0f} | {cpu:.2f} | {extra:+.2f} "
            f"| {_mb(p.memory_before)} -> {_mb(p.memory_clients)} -> {_mb(p.memory_peak)} "
            f"| {table or '-'} |"
        )
    lines.append("")
    for p in phases[1:]:
        keys = p.total("keys")
        if keys:
            # The writer-only phase's process CPU per write is the writer's; the rest
            # is the clients reading and counting their invalidations.
            own = p.bench_cpu - base.bench_cpu * (p.writes / max(1, base.writes))
            lines.append(
                f"- {p.name}: the receiving side (raw sockets, counting only, no cache "
                f"work) spent ~{own / keys * 1e6:.2f} µs of bench-process CPU per "
                f"invalidated key ({own / (p.seconds or 1.0):.2f} cores for all "
                f"{p.clients} clients)"
            )
    at_target = scale == 1 and not any(p.writer_behind for p in phases)
    heading = (
        "## At 50 instances x 10,000 writes/s (measured: this run is the target shape)"
        if at_target
        else "## Extrapolated to 50 instances x 10,000 writes/s (linear, not measured)"
    )
    lines += ["", heading, ""]
    if not at_target:
        lines.append(
            f"The run above is {args.clients} clients x {args.writes:,} writes/s; the target is "
            f"{TARGET_CLIENTS} x {TARGET_WRITES:,}, {scale:g} times the invalidation fan-out "
            "(clients x writes). Invalidation traffic and the CPU Redis spends sending it grow "
            "with clients x writes, so the numbers below multiply the measured ones by that "
            "factor (the per-client rate by the write factor only). This is an estimate: "
            "Redis runs commands on one thread, and batching of BCAST keys per event-loop "
            "iteration may change at other rates."
        )
        lines.append("")
    write_scale = TARGET_WRITES / args.writes
    for p in phases[1:]:
        secs = p.seconds or 1.0
        extra = p.redis_cpu / secs - base.redis_cpu / (base.seconds or 1.0)
        per_client = p.total("bytes") / secs / p.clients if p.clients else 0.0
        lines.append(
            f"- {p.name}: {p.total('messages') / secs * scale:,.0f} invalidation messages/s, "
            f"{p.total('bytes') / secs * scale / 1_048_576:,.1f} MB/s out of Redis in total, "
            f"{per_client * write_scale / 1024:,.0f} KB/s and "
            f"{p.total('keys') / secs / max(1, p.clients) * write_scale:,.0f} invalidated "
            "keys/s into each instance; extra Redis CPU "
            f"~{extra * scale:.2f} cores on top of the writes"
            + (" (more than the one core Redis has for commands)" if extra * scale > 1 else "")
        )
    default = phases[-1]
    bcast = phases[1]
    items = default.tracking.get("tracking_total_items", 0)
    if items:
        # The BCAST phase's memory step is its connections alone (one each); default
        # mode has two per client, the rest of its step is the tracking table.
        per_conn = (bcast.memory_clients - bcast.memory_before) / max(1, bcast.clients)
        step = default.memory_clients - default.memory_before - 2 * default.clients * per_conn
        per_item = step / items
        lines.append(
            f"- default tracking table: {items:,} items (clients x keys read) cost "
            f"~{_mb(step)} (the step in used_memory minus {2 * default.clients} "
            f"connections at ~{per_conn / 1024:,.0f} KB each, measured in the BCAST "
            f"phase), ~{per_item:,.0f} bytes per item; 50 instances "
            f"that each read 1,000,000 live sessions would hold 50,000,000 items, "
            f"~{per_item * 50_000_000 / 1_073_741_824:,.1f} GB (BCAST keeps no per-key table: "
            "one prefix entry per client)"
        )
    lines.append("")
    return "\n".join(lines)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench fleet",
        description="Redis's cost of CLIENT TRACKING invalidations for N near-cache "
        "instances and a session writer (bench/fleet.py).",
    )
    p.add_argument("--clients", type=int, default=50, help="tracking clients (default 50)")
    p.add_argument("--writes", type=int, default=2_000, help="writes/s (default 2000)")
    p.add_argument("--seconds", type=float, default=5.0, help="write time per phase (5)")
    p.add_argument("--out", type=Path, default=RESULTS / "fleet.md", help="markdown output")
    args = p.parse_args(argv)
    if not (1 <= args.clients <= 500 and 1 <= args.writes <= 50_000 and 0 < args.seconds <= 60):
        p.error("need 1 <= clients <= 500, 1 <= writes <= 50000, 0 < seconds <= 60")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
    fields = session_fields()
    value_bytes = sum(len(f) for f in fields)
    try:
        with BenchRedis() as server:
            phases = asyncio.run(asyncio.wait_for(run(server.port, args), 300))
    except KeyboardInterrupt:
        print("fleet: interrupted; redis-server stopped, nothing written", file=sys.stderr)
        return 130
    text = render(phases, args, value_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"fleet: wrote {args.out}", file=sys.stderr)
    return 0
