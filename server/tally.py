"""Counters and histograms for code that runs on one event loop, exposed through prometheus_client.

prometheus_client's Counter and Histogram take a lock at every increment (they may be shared between
threads): about 1 us an `inc()` and 2 us an `observe()` on this machine, tens of them per job. Here a
child is plain numbers: an increment is an attribute add, an observation a bisect. Everything that
counts runs on the scheduler's event loop, and so does the scrape (server/http.py renders the
registry in its handler), so no lock is needed. The families register on a CollectorRegistry as
custom collectors and are rendered by prometheus_client like its own (same names, same samples,
less the `_created` series). Same constructor and `labels()` as prometheus_client's.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class Tally:
    """One counter child."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Buckets:
    """One histogram child: a count per bucket (not cumulative until collected) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound is in it
        self.sum += value


class _Family(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Iterable[str],
                 registry: CollectorRegistry | None = None) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterable[Metric]:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return self.collect()  # for the registry's check of duplicate names (before any child exists)


class Counter(_Family):
    """A labelled counter family; `labels(...)` gives the child (bind it once and keep it)."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str],
                 registry: CollectorRegistry | None = None) -> None:
        self.children: dict[tuple[str, ...], Tally] = {}
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> Tally:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self.children[values] = Tally()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(values, child.value)
        yield family


class Histogram(_Family):
    """A labelled histogram family with fixed buckets (upper bounds, +Inf added)."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str], *, buckets: Sequence[float],
                 registry: CollectorRegistry | None = None) -> None:
        self.bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"{name}: buckets must increase")
        self.children: dict[tuple[str, ...], Buckets] = {}
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> Buckets:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self.children[values] = Buckets(self.bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*(_le(b) for b in self.bounds), "+Inf"]
        for values, child in self.children.items():
            cumulative, total = [], 0
            for edge, count in zip(edges, child.counts, strict=True):
                total += count
                cumulative.append((edge, total))
            family.add_metric(list(values), cumulative, child.sum)
        yield family


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (0.005, 1.0, 60.0)."""
    return repr(float(bound))
