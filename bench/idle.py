"""5. Idle cost: the daemon's RSS and CPU with N fake instances up and probed every second,
against the same daemon, run beside it over the same seconds, with the same N configured but
not started (so the difference is what supervising them costs)."""

from __future__ import annotations

import time
from pathlib import Path

from bench.configs import fake_dir
from bench.procs import cpu_seconds, daemon, rss_mib
from bench.stats import Row, paired

SECTION = "5 idle"


def run(work: Path, count: int, seconds: float, windows: int) -> list[Row]:
    busy_dir = fake_dir(work / "idle-busy", count, autostart=True, interval_s=1.0)
    calm_dir = fake_dir(work / "idle-calm", count, autostart=False, interval_s=1.0)
    with daemon(busy_dir, work) as busy, daemon(calm_dir, work) as calm:
        busy.wait_log("new=running", count, 120)
        calm.wait_log("daemon_ready", 1, 60)
        time.sleep(2.0)  # let start-up work settle before measuring
        window = seconds / windows
        cpu_busy, cpu_calm, rss_busy, rss_calm = [], [], [], []
        last = (time.perf_counter(), cpu_seconds(busy.pid), cpu_seconds(calm.pid))
        for _ in range(windows):
            time.sleep(window)
            now = (time.perf_counter(), cpu_seconds(busy.pid), cpu_seconds(calm.pid))
            wall = now[0] - last[0]
            cpu_busy.append(100 * (now[1] - last[1]) / wall)
            cpu_calm.append(100 * (now[2] - last[2]) / wall)
            rss_busy.append(rss_mib(busy.pid))
            rss_calm.append(rss_mib(calm.pid))
            last = now
        probes = busy.count("health_failed")
    label = f"same daemon, {count} configured, none started"
    rows = [
        paired(SECTION, f"daemon CPU, {count} fake up, probed 1/s ({window:.0f} s windows)",
               "% of a core", cpu_busy, cpu_calm, label, fmt=".2f"),
        paired(SECTION, f"daemon RSS, {count} fake up", "MiB", rss_busy, rss_calm, label),
    ]
    rows[0].notes.append(f"health_failed lines during the run: {probes}")
    return rows
