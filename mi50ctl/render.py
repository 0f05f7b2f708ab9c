"""Human and JSON renderings of mi50d's replies: aligned tables with units, progress lines.

Functions return text; `mi50ctl.ctl_cmd` decides where it goes. Only `Progress` writes, since an
updating terminal line is output by nature.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from typing import IO, Any

from mi50d.control.protocol import (
    DaemonInfo,
    GpuStatus,
    InstanceStatus,
    ReloadResult,
    StartProgress,
    StatusResult,
)


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)


def duration(seconds: float | None) -> str:
    """`42s`, `12m`, `3h05m`, `2d04h`: precise when short, coarse when long."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for row in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1]]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _endpoint(st: InstanceStatus) -> str:
    return f"{st.host}:{st.port}"


def _gpus(st: InstanceStatus) -> str:
    """`0,1`, or with what it holds: `0(13.0GiB),1(2.1GiB)`."""
    indices = sorted(st.vram) if st.gpus is None and st.vram else st.gpus
    if indices is None:
        return "all"
    return ",".join(f"{g}({st.vram[g] / 2**30:.1f}GiB)" if g in st.vram else str(g)
                    for g in indices) or "none"


def degraded(st: InstanceStatus) -> str | None:
    """The diagnosis of a running instance that is not what it was asked to be (e.g. a GPU
    instance serving from the CPU), else None."""
    if st.state == "running" and st.diagnosis and st.diagnosis.startswith("degraded"):
        return st.diagnosis
    return None


def started_text(st: InstanceStatus, elapsed_s: float | None) -> str:
    """`start`'s result: the degradation when there is one, then the endpoint line (last, for
    scripts that read it)."""
    line = f"{st.name} running: {st.endpoint} (ready in {duration(elapsed_s)})"
    note = degraded(st)
    return f"{st.name} {note}\n{line}" if note else line


def _note(st: InstanceStatus) -> str:
    """Why it is not running: the reason, then the diagnosis when there is one; for a running
    instance only a degradation."""
    if st.state == "running":
        return degraded(st) or ""
    note = st.reason
    if st.diagnosis and st.diagnosis not in note:
        note = f"{note}; {st.diagnosis}"
    return note


def status_table(instances: Sequence[InstanceStatus], gateway: bool = False) -> str:
    """One row per instance; the reason it is not running goes last, unpadded, so a long reason
    does not push the other columns apart. With the gateway on: on demand, requests in flight
    and when it was last used, too."""
    header = ("NAME", "STATE", "PID", "ENDPOINT", "UPTIME", "RESTARTS", "LAST EXIT", "GPUS",
              *(("ON-DEMAND", "IN-FLIGHT", "LAST-USED") if gateway else ()), "REASON")
    now = time.time()
    rows = [(st.name, st.state, str(st.pid) if st.pid else "-", _endpoint(st),
             duration(st.uptime_s), str(st.restarts), st.last_exit or "-", _gpus(st),
             *((("yes" if st.on_demand else "no"), str(st.in_flight),
                "-" if st.last_used is None else f"{duration(max(now - st.last_used, 0))} ago")
               if gateway else ()), _note(st))
            for st in instances]
    return table(header, rows)


def daemon_line(info: DaemonInfo) -> str:
    return (f"mi50d {info.version}  pid {info.pid}  up {duration(info.uptime_s)}  "
            f"config {info.config_dir}  socket {info.socket}"
            + (f"  gateway {info.gateway}" if info.gateway else ""))


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def gpu_table(gpus: Sequence[GpuStatus]) -> str:
    """One row per GPU: VRAM in GiB, busy %, temperatures in °C, power in W."""
    header = ("GPU", "GFX", "VRAM USED/TOTAL", "BUSY", "EDGE/JUNCTION/MEM", "POWER")
    rows = []
    for g in gpus:
        temps = "/".join(f"{g.temperatures_c[k]:.0f}" if k in g.temperatures_c else "-"
                         for k in ("edge", "junction", "mem"))
        rows.append((str(g.index), g.gfx, f"{_gib(g.vram_used)}/{_gib(g.vram_total)} GiB",
                     "-" if g.busy_percent is None else f"{g.busy_percent}%", f"{temps} °C",
                     "-" if g.power_w is None else f"{g.power_w:.0f} W"))
    return table(header, rows)


def status_text(result: StatusResult, with_daemon: bool) -> str:
    body = (status_table(result.instances, gateway=result.daemon.gateway is not None)
            if result.instances else "no instances configured")
    if with_daemon and result.gpus:
        body = f"{body}\n\n{gpu_table(result.gpus)}"
    return f"{daemon_line(result.daemon)}\n\n{body}" if with_daemon else body


def failure_text(st: InstanceStatus) -> str:
    """What `start` shows when an instance gave up: reason, diagnosis, the last lines."""
    lines = [f"{st.name} {st.state}: {st.reason}"]
    if st.diagnosis:
        lines.append(f"diagnosis: {st.diagnosis}")
    if st.last_exit:
        lines.append(f"last exit: {st.last_exit}")
    if st.last_lines:
        lines.append("last output:")
        lines += [f"  {line}" for line in st.last_lines]
    return "\n".join(lines)


def instances_text(verb: str, instances: Sequence[InstanceStatus]) -> str:
    if not instances:
        return "no instances configured"
    return "\n".join(f"{st.name}: {verb}; now {st.state}"
                     + (f" (last exit: {st.last_exit})" if st.last_exit else "")
                     for st in instances)


def reload_text(result: ReloadResult) -> str:
    def names(items: list[str]) -> str:
        return ", ".join(items) if items else "-"

    return table(("configuration reloaded", ""), [
        ("  added:", names(result.added)),
        ("  removed:", names(result.removed)),
        ("  restarted:", names(result.restarted)),
        ("  untouched:", names(result.unchanged)),
    ])


class Progress:
    """Live `start` progress: one line rewritten in place on a terminal, else a plain line each
    time the state or the latest output line changes."""

    def __init__(self, out: IO[str], tty: bool) -> None:
        self.out = out
        self.tty = tty
        self._last: tuple[str, str | None] | None = None
        self._drawn = False

    def update(self, p: StartProgress) -> None:
        text = f"{p.name}: {p.state} {duration(p.elapsed_s)}"
        if p.line:
            text += f"  {p.line}"
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns
            self.out.write("\r\x1b[K" + text[: max(width - 1, 20)])
            self._drawn = True
        elif self._last != (p.state, p.line):
            self.out.write(text + "\n")
        self._last = (p.state, p.line)
        self.out.flush()

    def close(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self._drawn = False
