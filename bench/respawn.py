"""2. Crash to respawn, and 3. hang detection, on a mi50d daemon process watched from outside.

2: `kill -9` of the instance; its exit is seen on a pidfd; the new process is seen in the daemon's
   children (/proc/<pid>/task/*/children, polled in a tight loop), then its exec of llama-server,
   then its first 200 on /health. Baseline: a bash loop running the same command line again each
   time it ends (`for i in ...; do llama-server ...; done`), watched the same way.
3: SIGSTOP of the instance at a random moment between probes; from then to its exit (mi50d's
   SIGKILL), against the configured bound `interval_s * failures + timeout_s`.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.configs import instance, one_dir
from bench.procs import (
    children,
    cmdline,
    daemon,
    exit_time,
    free_port,
    kill_quietly,
    poll_ready,
    spin_until,
    wait_until,
)
from bench.stats import Row, paired

RESPAWN_GOAL_MS = 50.0
NO_GIVING_UP = {"delay_s": 0, "burst": 100_000}


@dataclass
class Crash:
    exited: float  # kill -> exit seen (ms)
    forked: float  # exit -> new pid in the parent's children (ms)
    execd: float  # exit -> that pid runs the binary (ms)
    ready: float  # kill -> first 200 (ms)


def _crash_once(parent: int, port: int, binary: str, seconds: float) -> Crash:
    """Kill the instance listening on `port`; its successor is the child that execs the same
    command line (mi50d's preflight also runs short children of the binary: not those)."""
    marker = f"--port {port} "
    (old,) = [c for c in children(parent) if marker in cmdline(c) + " "]
    poll_ready(port, seconds)
    killed = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    exited = exit_time(old, 10)
    first_seen: dict[int, float] = {}
    found: list[int] = []

    def successor_execd() -> bool:
        now = time.perf_counter()
        for c in children(parent):
            if c != old:
                first_seen.setdefault(c, now)
        found[:] = [c for c in first_seen if marker in cmdline(c) + " "]
        return bool(found)

    execd = spin_until(successor_execd, seconds, f"a new {binary} on port {port}")
    forked = first_seen[found[0]]
    ready, _ = poll_ready(port, seconds)
    ms = 1000.0
    return Crash((exited - killed) * ms, (forked - exited) * ms, (execd - exited) * ms,
                 (ready - killed) * ms)


def crash_rows(work: Path, model: Path | None, label: str, reps: int, seconds: float,
               preflight: bool = False) -> list[Row]:
    tag = f"{label}-{'pf' if preflight else 'nopf'}"
    directory = one_dir(work / f"crash-{tag}", model, autostart=True, restart=NO_GIVING_UP,
                        preflight=preflight)
    if preflight:
        label += ", preflight on"
    argv, env, inst = instance(directory, "tiny")
    binary = Path(argv[0]).name
    loop_port = free_port()
    loop_argv = list(argv)
    loop_argv[loop_argv.index("--port") + 1] = str(loop_port)
    script = f'for i in $(seq 1 {reps + 2}); do "$@"; done'
    mine: list[Crash] = []
    base: list[Crash] = []
    with daemon(directory, work) as d, (work / f"loop-{tag}.log").open("ab") as out:
        loop = subprocess.Popen(["bash", "-c", script, "bash", *loop_argv], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
        try:
            d.wait_log("new=running", 1, seconds)
            for rep in range(reps):
                for who in (["mi50d", "bash"] if rep % 2 else ["bash", "mi50d"]):
                    if who == "mi50d":
                        mine.append(_crash_once(d.pid, inst.port, binary, seconds))
                        d.wait_log("new=running", rep + 2, seconds)  # its own view caught up
                    else:
                        base.append(_crash_once(loop.pid, loop_port, binary, seconds))
        finally:
            os.killpg(loop.pid, signal.SIGKILL)
            loop.wait(10)

    def pick(f: Callable[[Crash], float], data: list[Crash]) -> list[float]:
        return [f(c) for c in data]

    bl = "bash loop, same argv"
    respawn = paired("2 respawn", f"{label}: exit -> new pid (fork)", "ms",
                     pick(lambda c: c.forked, mine), pick(lambda c: c.forked, base), bl,
                     goal=f"< {RESPAWN_GOAL_MS:g} ms", fmt=".2f")
    respawn.met = respawn.value.median < RESPAWN_GOAL_MS
    execd = paired("2 respawn", f"{label}: exit -> exec of {binary}", "ms",
                   pick(lambda c: c.execd, mine), pick(lambda c: c.execd, base), bl,
                   goal=f"< {RESPAWN_GOAL_MS:g} ms", fmt=".2f")
    execd.met = execd.value.median < RESPAWN_GOAL_MS
    ready = paired("2 respawn", f"{label}: kill -9 -> /health 200 again", "ms",
                   pick(lambda c: c.ready, mine), pick(lambda c: c.ready, base), bl)
    respawn.notes.append("kill -> exit seen on the pidfd: "
                         f"{sorted(c.exited for c in mine)[len(mine) // 2]:.2f} ms (median)")
    return [respawn, execd, ready]


def hang_rows(work: Path, model: Path | None, label: str, reps: int, seconds: float,
              health: dict[str, float]) -> list[Row]:
    directory = one_dir(work / f"hang-{label}-{len(health)}-{health['timeout_s']:g}", model,
                        autostart=True, restart=NO_GIVING_UP, health=health)
    argv, _, inst = instance(directory, "tiny")
    binary = Path(argv[0]).name
    bound = health["interval_s"] * health["failures"] + health["timeout_s"]
    worst = health["failures"] * (health["interval_s"] + health["timeout_s"])
    rng = random.Random(7)
    detected = []
    with daemon(directory, work) as d:
        for rep in range(reps):
            d.wait_log("new=running", rep + 1, seconds)
            wait_until(lambda: any(binary in cmdline(c) for c in children(d.pid)), 10, "child")
            marker = f"--port {inst.port} "
            (pid,) = [c for c in children(d.pid) if marker in cmdline(c) + " "]
            time.sleep(rng.uniform(0, health["interval_s"]))  # a random phase between probes
            stopped = time.perf_counter()
            os.kill(pid, signal.SIGSTOP)
            try:
                gone = exit_time(pid, bound * 3 + 10)
            finally:
                kill_quietly(pid)
            detected.append((gone - stopped) * 1000)
    cfg = ", ".join(f"{k}={v:g}" for k, v in health.items())
    row = paired("3 hang", f"{label}: SIGSTOP -> killed ({cfg})", "ms", detected,
                 [bound * 1000] * len(detected), "configured bound", goal="<= bound")
    row.met = max(detected) <= bound * 1000
    row.notes.append(f"bound {bound:g} s = interval_s*failures+timeout_s; the probe loop sleeps "
                     f"interval_s after each probe, so its worst case is failures*(interval_s+"
                     f"timeout_s) = {worst:g} s")
    return [row]
