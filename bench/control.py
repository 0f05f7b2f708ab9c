"""4. Control latency: a `status` round trip over the control socket (a new connection each time,
as mi50ctl makes) with 1, 16 and 64 fake instances, against a uvloop server that answers the same
line with a reply of the same size and does nothing else; and the wall time of the whole
`mi50ctl status` process against `python -c pass` and `python -c 'import click'`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.configs import fake_dir
from bench.procs import VENV_BIN, daemon, run_timed, wait_until
from bench.stats import Row, paired, percentile

SECTION = "4 control"


class Ctl:
    """Talks to one daemon: raw protocol lines, or the mi50ctl program."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._id = 0

    def argv(self, *args: str) -> list[str]:
        return [str(VENV_BIN / "mi50ctl"), "--socket", str(self.path), *args]

    def wait_socket(self, seconds: float) -> None:
        def answers() -> bool:
            try:
                self.request("status")
            except OSError:
                return False
            return True
        wait_until(answers, seconds, f"control socket {self.path}", gap_s=0.02)

    def request(self, command: str, args: dict[str, object] | None = None) -> dict[str, object]:
        """One request on a new connection; the final frame, as parsed JSON."""
        self._id += 1
        line = json.dumps({"v": 1, "id": self._id, "command": command, "args": args or {}})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.path))
            s.sendall(line.encode() + b"\n")
            with s.makefile("rb") as f:
                for _ in range(100_000):
                    raw = f.readline()
                    if not raw:
                        raise ConnectionError("connection closed before the final frame")
                    frame: dict[str, object] = json.loads(raw)
                    if "event" not in frame:
                        return frame
        raise ConnectionError("no final frame")

    def reply_size(self) -> int:
        line = json.dumps({"v": 1, "id": 1, "command": "status", "args": {}}).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.path))
            s.sendall(line)
            with s.makefile("rb") as f:
                return len(f.readline())


def ctl_has(command: str) -> bool:
    """Whether this mi50ctl has `command` (the control plane landed while this was written)."""
    done = subprocess.run([str(VENV_BIN / "mi50ctl"), "--help"], capture_output=True, timeout=60,
                          check=False)
    return done.returncode == 0 and f"  {command} " in done.stdout.decode(errors="replace")


def _round_trip(path: Path, line: bytes) -> float:
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(line)
        with s.makefile("rb") as f:
            f.readline()
    return time.perf_counter() - start


@contextlib.contextmanager
def echo_server(path: Path, size: int) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.echo", str(path), str(size)],
                            stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready"
        yield
    finally:
        proc.terminate()
        proc.wait(30)


def socket_rows(work: Path, counts: list[int], blocks: int, per_block: int) -> list[Row]:
    rows = []
    line = json.dumps({"v": 1, "id": 1, "command": "status", "args": {}}).encode() + b"\n"
    for count in counts:
        directory = fake_dir(work / f"control-{count}", count, autostart=True)
        with daemon(directory, work, log_level="warning") as d:
            ctl = Ctl(d.socket)
            ctl.wait_socket(60)
            _wait_all_running(ctl, count)
            size = ctl.reply_size()
            echo = work / f"echo-{count}.sock"
            with echo_server(echo, size):
                p50, p99, b50, b99 = [], [], [], []
                for _ in range(blocks):
                    mine, base = [], []
                    for _ in range(per_block):
                        mine.append(_round_trip(d.socket, line) * 1000)
                        base.append(_round_trip(echo, line) * 1000)
                    p50.append(percentile(mine, 50))
                    p99.append(percentile(mine, 99))
                    b50.append(percentile(base, 50))
                    b99.append(percentile(base, 99))
        label = f"uvloop echo of {size} B"
        rows.append(paired(SECTION, f"status round trip, {count} inst: p50", "ms", p50, b50,
                           label, fmt=".2f"))
        rows.append(paired(SECTION, f"status round trip, {count} inst: p99", "ms", p99, b99,
                           label, fmt=".2f"))
        rows[-1].notes.append(f"{blocks} blocks of {per_block} round trips; the spread is "
                              "over blocks")
    return rows


def _wait_all_running(ctl: Ctl, count: int) -> None:
    def all_running() -> bool:
        result = ctl.request("status").get("result")
        if not isinstance(result, dict):
            return False
        states = [i["state"] for i in result["instances"]]
        return len(states) == count and all(s == "running" for s in states)

    wait_until(all_running, 120, f"{count} fakes running", 0.05)


def process_rows(work: Path, reps: int) -> list[Row]:
    directory = fake_dir(work / "control-ctl", 16, autostart=True)
    py = sys.executable
    ctl_s, bare, click_s = [], [], []
    with daemon(directory, work, log_level="warning") as d:
        ctl = Ctl(d.socket)
        ctl.wait_socket(60)
        _wait_all_running(ctl, 16)
        env = {**os.environ, "MI50D_SOCKET": str(d.socket)}
        for rep in range(reps + 1):
            a = run_timed(ctl.argv("status"), 60, env)
            b = run_timed([py, "-c", "pass"], 60)
            c = run_timed([py, "-c", "import click"], 60)
            if rep:
                ctl_s.append(a * 1000)
                bare.append(b * 1000)
                click_s.append(c * 1000)
        imports = _slowest_imports(ctl.argv("status"), env)
    rows = [
        paired(SECTION, "`mi50ctl status` process (16 inst)", "ms", ctl_s, bare, "python -c pass"),
        paired(SECTION, "`mi50ctl status` process (16 inst)", "ms", ctl_s, click_s,
               "python -c 'import click'"),
    ]
    rows[-1].notes.append("slowest imports of `mi50ctl status` (python -X importtime, cumulative): "
                          + imports)
    return rows


def _slowest_imports(argv: list[str], env: dict[str, str]) -> str:
    """The imports under mi50ctl.cli that cost most (cumulative), from one `-X importtime` run."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env,
                          capture_output=True, timeout=60, check=False)
    group: list[tuple[int, str]] = []
    for raw in done.stderr.decode(errors="replace").splitlines():
        parts = raw.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        depth = (len(parts[2]) - len(parts[2].lstrip()) - 1) // 2
        name, cumulative = parts[2].strip(), int(parts[1])
        if depth > 0:
            group.append((cumulative, name))
        elif name == "mi50ctl.cli":  # a module's line follows those of what it imported
            group.sort(reverse=True)
            top = ", ".join(f"{n} {us / 1000:.0f} ms" for us, n in group[:6])
            return f"mi50ctl.cli {cumulative / 1000:.0f} ms in all; largest: {top}"
        else:
            group = []
    return "mi50ctl.cli not found in -X importtime output"
