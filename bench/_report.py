"""Markdown for bench/results/: one table per scenario plus the machine it ran on."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata

from . import _targets
from ._measure import Row, Scenario
from ._server import redis_server_version

PACKAGES = [
    "asgi-redis-kit",
    "starlette",
    "fastapi",
    "redis",
    "hiredis",
    "starsessions",
    "fastapi-cache2",
    "cashews",
    "aiocache",
    "asgi-caches",
    "uvicorn",
]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        if name == "asgi-redis-kit":
            try:
                import asgi_redis_kit

                return f"{asgi_redis_kit.__version__} (source tree)"
            except ImportError:
                pass
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load() -> str:
    """The 1/5/15-minute load average: other work on the box moves the tails."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def machine() -> list[str]:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- Date: {now}; repo HEAD {_git_head()}",
        f"- Machine: nproc={nproc}, {_cpu_model()}, {platform.system()} {platform.release()}; "
        f"load average {load()} when the report was written",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"redis-server {redis_server_version()} (the bench's own, loopback)",
        f"- Packages: {versions}",
    ]


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(row: Row, ours: Row | None) -> str:
    if ours is None or ours.median_us is None or row.median_us is None:
        return "-"
    if row is ours:
        return "1.00 (ours)"
    return f"{row.median_us / ours.median_us:.2f}"


def _cpu_ratio(row: Row, ours: Row | None) -> str:
    if ours is None or not ours.cpu_us or row.cpu_us is None:
        return "-"
    if row is ours:
        return "1.00 (ours)"
    return f"{row.cpu_us / ours.cpu_us:.2f}"


def _label(row: Row) -> str:
    name = f"**{row.tool}**" if row.ours else row.tool
    return f"{name} (reference)" if row.reference else name


def _server(row: Row) -> str:
    if row.cmds is None:
        return "-"
    if not row.breakdown or row.breakdown == "-":
        return f"{row.cmds:g}"
    return f"{row.cmds:.3g}: {row.breakdown}"


def _timing_table(rows: list[Row]) -> list[str]:
    ours = next((r for r in rows if r.ours and r.median_us is not None), None)
    out = [
        "| tool | µs/req median | µs/req p95 | req/s | time vs ours | CPU µs/req "
        "| CPU vs ours | cmds sent/req | round trips/req | server-side commands/req "
        "| server cmds/req, all timed requests | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for row in rows:
        note = row.note
        if row.error:
            note = f"NOT MEASURED: {row.error}"
        out.append(
            f"| {_label(row)} | {_num(row.median_us, 1)} | {_num(row.p95_us, 1)} "
            f"| {_num(row.rps)} | {_ratio(row, ours)} | {_num(row.cpu_us, 1)} "
            f"| {_cpu_ratio(row, ours)} | {_num(row.sent, 2)} "
            f"| {_num(row.round_trips, 2)} | {_server(row)} | {_cmds(row.timed_cmds)} | {note} |"
        )
    return out


def _cmds(value: float | None) -> str:
    # Exact zero must read as zero, not as a rounded "0.00".
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.3g}"


def _correctness_table(rows: list[Row]) -> list[str]:
    out = [
        "| tool | result | cmds sent/req | round trips/req | server-side commands (total) "
        "| notes |",
        "|---|---|---:|---:|---|---|",
    ]
    for row in rows:
        note = row.note
        if row.error:
            note = f"NOT MEASURED: {row.error}"
        out.append(
            f"| {_label(row)} | {row.correctness or '-'} | {_num(row.sent, 2)} "
            f"| {_num(row.round_trips, 2)} | {row.breakdown or '-'} | {note} |"
        )
    return out


def _summary(scenarios: list[Scenario]) -> list[str]:
    """One line per scenario: every tool's time (and CPU) relative to ours, or its
    correctness result."""
    out = [
        "## Summary",
        "",
        "Timed rows: `tool time/ours (CPU/ours)`; >1 means slower than ours.",
        "",
    ]
    for sc in scenarios:
        ours = next((r for r in sc.rows if r.ours and r.median_us is not None), None)
        parts = []
        for row in sc.rows:
            if row.error:
                parts.append(f"{row.tool}: not measured")
            elif row.correctness and row.median_us is None:
                parts.append(f"{row.tool}: {row.correctness}")
            elif row is ours:
                rt = "-" if row.round_trips is None else f"{row.round_trips:g}"
                parts.append(f"**ours {row.median_us:,.0f} µs, {rt} RT/req**")
            elif ours is not None and ours.median_us and row.median_us is not None:
                cpu = ""
                if ours.cpu_us and row.cpu_us:
                    cpu = f" ({row.cpu_us / ours.cpu_us:.2f})"
                parts.append(f"{row.tool} {row.median_us / ours.median_us:.2f}{cpu}")
            elif row.note:
                parts.append(f"{row.tool}: {row.note}")
        out.append(f"- {sc.title}: " + "; ".join(parts))
    out.append("")
    return out


def render(
    title: str,
    scenarios: list[Scenario],
    *,
    settings: str,
    notes: list[str],
) -> str:
    lines = [f"# {title}", "", *machine(), f"- Settings: {settings}", ""]
    lines += [
        "Read the ratios, not the absolute times: this is a small shared machine. "
        "`time vs ours` is the tool's median divided by ours (2.00 = twice as slow). "
        "Commands are counted server-side (`INFO commandstats` deltas, MULTI/EXEC and "
        "script-internal calls included); round trips client-side (a pipeline is one). "
        "See bench/README.md.",
        "",
    ]
    lines += _targets.table(scenarios)
    lines += _summary(scenarios)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    for sc in scenarios:
        lines += [f"## {sc.title}", "", sc.what, ""]
        timed = any(r.median_us is not None for r in sc.rows) or not any(
            r.correctness for r in sc.rows
        )
        lines += _timing_table(sc.rows) if timed else _correctness_table(sc.rows)
        lines.append("")
    return "\n".join(lines)
