"""Processes and loopback HTTP, measured from outside: /proc readings, pidfd exit times, a tight
`/health` poller, a completion request, and a mi50d daemon run as its own process.

Every wait here is bounded by a deadline and raises TimeoutError past it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


class Deadline:
    """A time budget; `check()` raises once it is spent, naming what was awaited."""

    def __init__(self, seconds: float, what: str) -> None:
        self.end = time.monotonic() + seconds
        self.what = what
        self.seconds = seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError(f"{self.what}: not within {self.seconds:g}s")


def spin_until(predicate: Callable[[], bool], seconds: float, what: str,
               max_iterations: int = 50_000_000) -> float:
    """Call `predicate` in a tight loop until true; return perf_counter() at that moment."""
    deadline = Deadline(seconds, what)
    for i in range(max_iterations):
        if predicate():
            return time.perf_counter()
        if i % 64 == 0:
            deadline.check()
    raise TimeoutError(f"{what}: not within {max_iterations} tries")


def wait_until(predicate: Callable[[], bool], seconds: float, what: str,
               gap_s: float = 0.005) -> float:
    """Like `spin_until`, with a short sleep between tries (for waits we do not time)."""
    deadline = Deadline(seconds, what)
    for _ in range(int(seconds / gap_s) + 2):
        if predicate():
            return time.perf_counter()
        deadline.check()
        time.sleep(gap_s)
    raise TimeoutError(f"{what}: not within {seconds:g}s")


# ---- /proc -----------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """Direct children of `pid`, read from every thread's `children` file."""
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError), \
                    open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid`'s live threads, in seconds, at nanosecond resolution (schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), \
                open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def exit_time(pid: int, seconds: float) -> float:
    """Block until `pid` (not necessarily our child) has exited; return perf_counter() then.

    A pidfd polls readable when the process exits (becomes a zombie), before anyone reaps it.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return time.perf_counter()
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(int(seconds * 1000)):
            raise TimeoutError(f"pid {pid} did not exit within {seconds:g}s")
        return time.perf_counter()
    finally:
        os.close(fd)


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# ---- loopback HTTP ---------------------------------------------------------------------------

def health_status(port: int, host: str = "127.0.0.1", path: str = "/health",
                  timeout_s: float = 2.0) -> int | None:
    """One GET on a new connection; the HTTP status, or None when nothing answered."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return None
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = sock.recv(64)
        parts = data.split(None, 2)
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except OSError:
        return None
    finally:
        sock.close()


def poll_ready(port: int, seconds: float, gap_s: float = 0.0) -> tuple[float, int]:
    """Probe /health, a new connection each time, until 200: as fast as possible, or with a
    sleep of `gap_s` between probes. Returns (perf_counter at the 200, number of probes)."""
    deadline = Deadline(seconds, f"port {port} ready")
    for probes in range(1, 10_000_000):
        if health_status(port) == 200:
            return time.perf_counter(), probes
        if probes % 16 == 0:
            deadline.check()
        if gap_s:
            time.sleep(gap_s)
    raise TimeoutError(f"port {port}: no 200")


def complete(url: str, n_predict: int = 8, timeout_s: float = 60) -> float:
    """POST /completion to `url` (http://host:port) on a new connection; seconds it took."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"prompt": "hello", "n_predict": n_predict, "temperature": 0,
                       "cache_prompt": False}).encode()
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"completion answered {resp.status}: {payload[:200]!r}")
    finally:
        conn.close()
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- a daemon in its own process ---------------------------------------------------------------

@dataclass
class DaemonProcess:
    """`mi50d --config-dir DIR --socket PATH` with its log in a file we can search."""

    proc: subprocess.Popen[bytes]
    log: Path
    socket: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def count(self, needle: str) -> int:
        return self.log_text().count(needle)

    def wait_log(self, needle: str, count: int, seconds: float) -> None:
        """Wait until the log holds `needle` at least `count` times (the log is the contract)."""
        def seen() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mi50d exited ({self.proc.returncode}); log {self.log}")
            return self.count(needle) >= count
        wait_until(seen, seconds, f"{count}x {needle!r} in {self.log}", gap_s=0.01)


@contextlib.contextmanager
def daemon(config_dir: Path, workdir: Path, log_level: str = "info") -> Iterator[DaemonProcess]:
    """Run mi50d; on leaving, SIGTERM it and wait for its orderly shutdown (bounded)."""
    log = workdir / f"mi50d-{config_dir.name}.log"
    sock = workdir / f"{config_dir.name}.sock"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "mi50d"), "--config-dir", str(config_dir), "--socket", str(sock),
             "--log-level", log_level],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )
    try:
        yield DaemonProcess(proc, log, sock)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def by_hand(argv: Sequence[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The baseline: the same command line started the way a user would, output to a file."""
    with log.open("ab") as out:
        proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, cwd="/", start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run_timed(argv: Sequence[str], seconds: float = 60, env: dict[str, str] | None = None) -> float:
    """Wall time of one process from spawn to exit; raises if it fails."""
    start = time.perf_counter()
    done = subprocess.run(list(argv), capture_output=True, timeout=seconds, env=env, check=False)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-400:]}")
    return took
