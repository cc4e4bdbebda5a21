"""What a Backend counts of its Redis calls: failures always, latency on demand.

Failures (``CallStats``) are counted on the failure path only, so they cost a
request nothing. Latency (``Latency``) is a histogram with fixed buckets that a
metrics exporter switches on (``backend.calls.latency = Latency()``): two clock
reads, a bisect and a list increment per call, and one attribute test when off.
Counts are kept per bucket (not cumulative) and summed at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

#: Upper bounds, in seconds, of the latency buckets (Prometheus' ``le``). A
#: loopback round trip is ~0.1 ms, a LAN one ~0.5 ms; the last bound is the
#: default call deadline, which no call outlives.
BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


class Histogram:
    """One operation's calls: counts per bucket (the last one is +Inf) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds


class Latency:
    """Histograms of Redis call durations by operation (a small, fixed set of
    names chosen in the code, never a key)."""

    __slots__ = ("by_operation",)

    def __init__(self) -> None:
        self.by_operation: dict[str, Histogram] = {}

    def observe(self, operation: str, seconds: float) -> None:
        histogram = self.by_operation.get(operation)
        if histogram is None:
            histogram = self.by_operation[operation] = Histogram()
        histogram.observe(seconds)


@dataclass
class CallStats:
    """Calls through ``Backend.call()`` that failed, by operation: ``timeouts``
    (the deadline passed) and ``errors`` (any other Redis or connection
    failure). ``latency``: the duration histograms, or None (not measured)."""

    timeouts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency: Latency | None = None
