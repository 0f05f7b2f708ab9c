"""Histograms of what the engine observes: start durations and health probe durations.

The supervisor calls `Supervisor.observe(name, event, seconds)` (a no-op by default);
`EngineMetrics.observe` is what the daemon sets there. Events: "start" (spawn to the first 200
of the health path) and "health_probe" (one probe of a running instance, answered or not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Histogram

START_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 900)
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.start = Histogram(
            "mi50d_instance_start_duration_seconds", "Time from spawning llama-server to the "
            "first 200 of its health path", ["instance"], buckets=START_BUCKETS, registry=registry)
        self.probe = Histogram(
            "mi50d_instance_health_probe_duration_seconds", "Duration of one health probe of a "
            "running instance, answered or timed out", ["instance"], buckets=PROBE_BUCKETS,
            registry=registry)

        self._seen: set[str] = set()

    def observe(self, name: str, event: str, seconds: float) -> None:
        if event == "start":
            self.start.labels(name).observe(seconds)
        elif event == "health_probe":
            self.probe.labels(name).observe(seconds)
        else:
            return
        self._seen.add(name)

    def forget_all_but(self, names: Iterable[str]) -> None:
        """Drop the series of instances no longer configured (removed by a reload)."""
        gone = self._seen.difference(names)
        for name in gone:
            for histogram in (self.start, self.probe):
                with contextlib.suppress(KeyError):
                    histogram.remove(name)
        self._seen -= gone
