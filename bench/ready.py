"""1. Time to ready: mi50d starting an instance until it is running, against the same llama-server
command line started by hand and probed on /health as fast as possible (a tight loop, a new
connection each time) until the first 200.

Two ways to measure the mi50d side:
- `inproc`: a Supervisor in this process; from `start(name)` to the RUNNING state change.
- `mi50ctl`: a daemon process; the wall time of the whole `mi50ctl start NAME` process (it
  waits until running by default).
Rounds alternate which side goes first; the first round of each warms the page cache and is
discarded.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.configs import instance, one_dir
from bench.control import Ctl
from bench.inproc import supervised
from bench.procs import by_hand, daemon, free_port, poll_ready, run_timed
from bench.stats import Row, paired

SECTION = "1 ready"
GOAL_RATIO = 1.05
# A second baseline: a by-hand loop that sleeps between probes, like `until curl ...; do sleep
# 0.005; done`. The tight loop makes llama-server answer thousands of 503s while it loads, on a
# machine with two cores, and so slows the load it is timing.
GENTLE_S = 0.005


def _hand_argv(argv: list[str], port: int) -> list[str]:
    """The same command line on another port (so the two never meet a socket in TIME_WAIT)."""
    out = list(argv)
    out[out.index("--port") + 1] = str(port)
    return out


def _by_hand(argv: list[str], env: dict[str, str], log: Path, seconds: float,
             gap_s: float = 0.0) -> tuple[float, int, float]:
    """(seconds to the first 200, probes made, seconds until Popen returned)."""
    port = int(argv[argv.index("--port") + 1])
    start = time.perf_counter()
    with by_hand(argv, env, log):
        spawned = time.perf_counter()
        ready, probes = poll_ready(port, seconds, gap_s)
    return ready - start, probes, spawned - start


async def run_inproc(work: Path, model: Path | None, label: str, reps: int, seconds: float,
                     args: tuple[str, ...] = (), preflight: bool = False) -> list[Row]:
    tag = f"{label}-{'pf' if preflight else 'nopf'}".replace(" ", "")
    directory = one_dir(work / f"ready-{tag}", model, args=list(args), preflight=preflight)
    argv, env, _ = instance(directory, "tiny")
    hand = _hand_argv(argv, free_port())
    mine, base, probes, mine_spawn, base_spawn, gentle = [], [], [], [], [], []
    async with supervised(directory) as (sup, clock):
        for rep in range(reps + 1):
            for who in (["sup", "hand", "gentle"] if rep % 2 else ["gentle", "hand", "sup"]):
                if who == "sup":
                    runs = clock.count("tiny", "running")
                    t0 = time.perf_counter()
                    sup.start("tiny")
                    took = await clock.wait(["tiny"], "running", {"tiny": runs + 1}, seconds) - t0
                    spawned = clock.last("tiny", "spawned") - t0
                    await sup.stop("tiny")
                    if rep:
                        mine.append(took * 1000)
                        mine_spawn.append(spawned * 1000)
                elif who == "gentle":
                    took, _, _ = _by_hand(hand, env, work / f"hand-{tag}.log", seconds, GENTLE_S)
                    if rep:
                        gentle.append(took * 1000)
                else:
                    took, n, spawned = _by_hand(hand, env, work / f"hand-{tag}.log", seconds)
                    if rep:
                        base.append(took * 1000)
                        probes.append(n)
                        base_spawn.append(spawned * 1000)
    how = ", preflight on" if preflight else ""
    row = _row(f"{label}: Supervisor.start -> RUNNING (in-process{how})", mine, base, probes)
    row.notes.append(f"start -> pid known: {statistics.median(mine_spawn):.1f} ms (by hand, "
                     f"Popen returned: {statistics.median(base_spawn):.1f} ms), medians")
    return [row, _gentle_row(row.figure, mine, gentle)]


def run_mi50ctl(work: Path, model: Path | None, label: str, reps: int, seconds: float,
                args: tuple[str, ...] = ()) -> list[Row]:
    directory = one_dir(work / f"ready-ctl-{label}".replace(" ", ""), model, args=list(args))
    log = work / f"hand-ctl-{label}.log"
    argv, env, _ = instance(directory, "tiny")
    hand = _hand_argv(argv, free_port())
    mine, base, probes, gentle = [], [], [], []
    with daemon(directory, work) as d:
        ctl = Ctl(d.socket)
        ctl.wait_socket(60)
        for rep in range(reps + 1):
            for who in (["sup", "hand", "gentle"] if rep % 2 else ["gentle", "hand", "sup"]):
                if who == "sup":
                    took = run_timed(ctl.argv("start", "tiny"), seconds)
                    run_timed(ctl.argv("stop", "tiny"), 60)
                    if rep:
                        mine.append(took * 1000)
                elif who == "gentle":
                    took, _, _ = _by_hand(hand, env, log, seconds, GENTLE_S)
                    if rep:
                        gentle.append(took * 1000)
                else:
                    took, n, _ = _by_hand(hand, env, log, seconds)
                    if rep:
                        base.append(took * 1000)
                        probes.append(n)
    row = _row(f"{label}: `mi50ctl start` (waits) process", mine, base, probes)
    return [row, _gentle_row(row.figure, mine, gentle)]


def _row(figure: str, mine: list[float], base: list[float], probes: list[int]) -> Row:
    row = paired(SECTION, figure, "ms", mine, base, "by hand, tight /health poll",
                 goal=f"ratio <= {GOAL_RATIO}")
    row.met = row.ratio is not None and row.ratio.median <= GOAL_RATIO
    row.notes.append(f"by hand: {sorted(probes)[len(probes) // 2]} probes to the first 200 (median)")
    return row


def _gentle_row(figure: str, mine: list[float], gentle: list[float]) -> Row:
    row = paired(SECTION, figure, "ms", mine, gentle,
                 f"by hand, /health every {GENTLE_S * 1000:g} ms", goal=f"ratio <= {GOAL_RATIO}")
    row.met = row.ratio is not None and row.ratio.median <= GOAL_RATIO
    return row
