"""Metrics (issue #12), idle cost: two daemons side by side over the same minute, each with 16
fake instances up and probed every 5 s (the default) on the recorded two-MI50 sysfs tree; a real
Prometheus scrapes one every 5 s, nobody scrapes the other. CPU from schedstat, per window.

    .venv/bin/python -m bench.metrics_idle [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.metrics_scrape import free_ports, host_paths, host_tree
from bench.procs import cpu_seconds, free_port, wait_until
from bench.stats import Row, paired, text_table
from tests.support import fake_daemon, fake_env, write_config

SECTION = "M2 idle"
GOAL_PCT = 0.2
COUNT = 16


def config(work: Path, name: str, root: Path) -> Path:
    ports = free_ports(COUNT)
    insts = {f"f{i:03d}": {"model": "/dev/null", "port": ports[i], "autostart": True,
                           "env": fake_env(), "metrics": False, "gpus": [i % 2]}
             for i in range(COUNT)}
    return write_config(work / name, fake_daemon(host=host_paths(root)), insts)


@contextlib.contextmanager
def metrics_daemon(directory: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bench.metrics_daemon", str(directory),
                                 str(port)], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_until(lambda: b"metrics_ready" in log.read_bytes(), 60, f"{directory.name} serving")
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


@contextlib.contextmanager
def prometheus(target: str, work: Path, interval_s: float) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("no prometheus binary (apt-get install prometheus)")
    port = free_port()
    cfg = work / "prometheus.yml"
    cfg.write_text(f"global:\n  scrape_interval: {interval_s:g}s\n  scrape_timeout: 4s\n"
                   "scrape_configs:\n  - job_name: mi50d\n    honor_labels: true\n"
                   f"    static_configs:\n      - targets: ['{target}']\n")
    with (work / "prometheus.log").open("wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={cfg}",
                                 f"--storage.tsdb.path={work / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ok(f"{url}/-/ready"), 60, "prometheus ready", gap_s=0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def scrapes(prom: str, seconds: float) -> int:
    """How many scrapes of mi50d Prometheus made in the last `seconds` (its `up` samples)."""
    query = urllib.parse.quote(f"sum(count_over_time(up[{seconds:.0f}s]))")
    with urllib.request.urlopen(f"{prom}/api/v1/query?query={query}", timeout=5) as resp:
        result = json.load(resp)["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def run(work: Path, seconds: float, windows: int, interval_s: float = 5.0) -> list[Row]:
    root = host_tree(work)
    scraped_dir, calm_dir = config(work, "scraped", root), config(work, "calm", root)
    port_s, port_c = free_port(), free_port()
    with metrics_daemon(scraped_dir, port_s, work / "scraped.log") as scraped, \
            metrics_daemon(calm_dir, port_c, work / "calm.log") as calm, \
            prometheus(f"127.0.0.1:{port_s}", work, interval_s) as prom:
        for port in (port_s, port_c):
            def all_running(port: int = port) -> bool:
                return _metrics(port).count(b'state="running"} 1.0') >= COUNT

            wait_until(all_running, 120, "all fakes running", gap_s=0.2)
        time.sleep(interval_s + 1)  # start-up settles; Prometheus has scraped at least once
        window = seconds / windows
        ours, theirs = [], []
        last = (time.perf_counter(), cpu_seconds(scraped.pid), cpu_seconds(calm.pid))
        for _ in range(windows):
            time.sleep(window)
            now = (time.perf_counter(), cpu_seconds(scraped.pid), cpu_seconds(calm.pid))
            wall = now[0] - last[0]
            ours.append(100 * (now[1] - last[1]) / wall)
            theirs.append(100 * (now[2] - last[2]) / wall)
            last = now
        seen = scrapes(prom, seconds)
    row = paired(SECTION, f"daemon CPU, {COUNT} fake up, scraped every {interval_s:g} s "
                          f"({window:.0f} s windows)", "% of a core", ours, theirs,
                 f"same daemon, {COUNT} fake up, not scraped", fmt=".3f",
                 goal=f"difference <= {GOAL_PCT} %")
    diffs = [a - b for a, b in zip(ours, theirs, strict=True)]
    row.met = sorted(diffs)[len(diffs) // 2] <= GOAL_PCT
    row.notes.append(f"Prometheus scrapes during the run: {seen} (its own count)")
    return [row]


def _metrics(port: int) -> bytes:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return bytes(resp.read())
    except OSError:
        return b""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds, windows = (20.0, 2) if args.quick else (60.0, 6)
    with tempfile.TemporaryDirectory(prefix="m5idle-") as tmp:
        rows = run(Path(tmp), seconds, windows)
    print(text_table(rows))
    for row in rows:
        for note in row.notes:
            print(f"- {row.figure}: {note}")


if __name__ == "__main__":
    main()
