"""The headline chart: every peer's median time divided by ours, per timed scenario,
as a PNG (``docs/bench.png`` after a complete run). Drawn from the same rows as the
markdown report, so the two never disagree."""

from __future__ import annotations

from pathlib import Path

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
    height = sum(len(p) for _, p in groups) * 0.32 + len(groups) * 0.5 + 2.0
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
    ax.set_xlabel("peer median time / asgi_redis_kit median time (log scale; > 1 = peer slower)")
    ax.set_title(f"asgi_redis_kit vs peers: time per request relative to ours\n{subtitle}")
    ax.grid(axis="x", which="both", alpha=0.3)
    # Beside the plot, so it never covers a bar or the axis label.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None
