"""The headline chart: every peer's median time divided by ours, per timed scenario,
as a PNG (``docs/bench.png`` after a complete run). Drawn from the same rows as the
markdown report, so the two never disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import _targets
from ._measure import Row, Scenario

# One colour per tool across all scenarios, in first-seen order.
PALETTE = [
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
]


def ratios(scenarios: list[Scenario]) -> list[tuple[str, list[tuple[Row, float]]]]:
    """Per timed scenario with a timed row of ours: (title, [(peer row, peer/ours)]).
    Reference lines (no cache, cookie sessions) and failed rows are left out: the
    chart answers "how much slower is a peer doing the same job"."""
    out = []
    for sc in scenarios:
        ours = next((r for r in sc.rows if r.ours and r.median_us), None)
        if ours is None or ours.median_us is None:
            continue
        peers = [
            (r, r.median_us / ours.median_us)
            for r in sc.rows
            if r is not ours and not r.reference and not r.error and r.median_us is not None
        ]
        if peers:
            out.append((sc.title, peers))
    return out


def _label(row: Row) -> str:
    # A fast answer that is wrong must not read as a win.
    stale = "two-instance check: stale" in row.note
    return f"{row.tool} [STALE across instances]" if stale else row.tool


def _targets_panel(ax: Any, goals: list[_targets.Target], zeros: list[_targets.Target]) -> None:
    """The issue's targets: the measured ratio as a bar (green met, red missed) and
    the limit as a black tick."""
    for y, t in enumerate(goals):
        assert t.measured is not None
        ax.barh(y, t.measured, height=0.7, color="#55a868" if t.met else "#c44e52")
        ax.plot([t.limit, t.limit], [y - 0.45, y + 0.45], color="black", linewidth=2)
        ax.text(
            t.measured * 1.04, y, f"{t.measured:.2f} ({t.kind} {t.limit:g})", va="center",
            fontsize=8,
        )  # fmt: skip
    values = [t.measured for t in goals if t.measured] + [t.limit for t in goals]
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 1.6, max(values) * 2.2)
    steps = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0]
    shown = [v for v in steps if min(values) / 1.6 <= v <= max(values) * 2.2]
    ax.set_xticks(shown, [f"{v:g}" for v in shown])
    ax.xaxis.set_minor_locator(matplotlib_ticker().NullLocator())
    ax.set_yticks(range(len(goals)), [t.label for t in goals], fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", which="both", alpha=0.3)
    cmds = ", ".join(
        f"{t.label.split(':')[0].removesuffix(', near')} {t.measured:g}" for t in zeros
    )
    ax.set_title(
        "asgi_redis_kit, issue 8 targets: measured ratio (green met, red missed), "
        "black tick = limit\n"
        f"Redis commands/req with the near cache: {cmds}",
        fontsize=9,
    )


def matplotlib_ticker() -> Any:
    import matplotlib.ticker

    return matplotlib.ticker


def write(scenarios: list[Scenario], path: Path, *, subtitle: str) -> str | None:
    """Draw the chart to ``path``; returns why not when it could not."""
    groups = ratios(scenarios)
    if not groups:
        return "chart: no timed scenario with a row of ours, nothing drawn"
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a server
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "chart: matplotlib is not installed (it is in the bench dependency group)"

    tools: list[str] = []
    for _, peers in groups:
        for row, _ratio in peers:
            if _label(row) not in tools:
                tools.append(_label(row))
    colour = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(tools)}

    bar_h = 0.8
    y = 0.0
    ticks: list[float] = []
    tick_labels: list[str] = []
    drawn: set[str] = set()
    goals = [t for t in _targets.evaluate(scenarios) if t.unit == "x" and t.measured]
    zeros = [t for t in _targets.evaluate(scenarios) if t.unit == "cmds" and t.measured is not None]
    height = sum(len(p) for _, p in groups) * 0.32 + len(groups) * 0.5 + 2.0
    top = len(goals) * 0.32 + 1.6 if goals else 0.0
    if goals:
        fig, (tax, ax) = plt.subplots(
            2, 1, figsize=(9, max(4.0, height) + top), height_ratios=[top, max(4.0, height)]
        )
        _targets_panel(tax, goals, zeros)
    else:
        fig, ax = plt.subplots(figsize=(9, max(4.0, height)))
    values = [ratio for _, peers in groups for _, ratio in peers]
    for title, peers in groups:
        first = y
        for row, ratio in peers:
            name = _label(row)
            ax.barh(
                y,
                ratio,
                height=bar_h,
                color=colour[name],
                hatch="//" if "STALE" in name else None,
                label=name if name not in drawn else None,
            )
            drawn.add(name)
            ax.text(ratio * 1.03, y, f"{ratio:.2f}", va="center", fontsize=8)
            y += 1
        ticks.append((first + y - 1) / 2)
        # "Cache (a): hit on a small JSON route" -> two lines
        tick_labels.append(title.replace(": ", "\n", 1))
        y += 0.8  # a gap between scenarios

    ax.axvline(1.0, color="black", linewidth=1.2, linestyle="--", label="1.0 = as fast as ours")
    ax.set_xscale("log")
    low, high = min(*values, 1.0), max(*values, 1.0)
    ax.set_xlim(low / 1.6, high * 1.6)
    # Plain numbers on the log axis ("0.5", "2"), not 5x10^-1.
    steps = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0]
    shown = [v for v in steps if low / 1.6 <= v <= high * 1.6]
    ax.set_xticks(shown, [f"{v:g}" for v in shown])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yticks(ticks, tick_labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(
        "tool median time / asgi_redis_kit median time (log scale; > 1 = slower than ours)"
    )
    ax.set_title(
        f"time per request relative to asgi_redis_kit without the near cache\n{subtitle}",
        fontsize=9,
    )
    ax.grid(axis="x", which="both", alpha=0.3)
    # Beside the plot, so it never covers a bar or the axis label.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None
