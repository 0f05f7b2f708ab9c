"""6. Scale: start-all and stop-all of N fake instances, against the same N command lines started
and stopped by hand; a reload of N with one changed, against restarting that one instance.

The supervisor runs in this process (uvloop, like the daemon), with a clock on its state changes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from bench.configs import fake_dir, instance
from bench.inproc import StateClock, supervised
from bench.procs import Deadline, health_status
from bench.stats import Row, Summary, paired
from mi50d.config import load_config
from mi50d.engine.supervisor import Supervisor
from mi50d.host.accounts import account_for

SECTION = "6 scale"


def _start_by_hand(cmds: list[tuple[list[str], dict[str, str], int]],
                   log: Path) -> tuple[float, list[subprocess.Popen[bytes]]]:
    """Spawn every command line, then probe every port round-robin until all answer 200."""
    start = time.perf_counter()
    procs = []
    with log.open("ab") as out:
        for argv, env, _port in cmds:
            procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=out, cwd="/", start_new_session=True))
    pending = {port for _, _, port in cmds}
    deadline = Deadline(120, "all fakes ready by hand")
    for _ in range(1_000_000):
        pending = {p for p in pending if health_status(p) != 200}
        if not pending:
            return time.perf_counter() - start, procs
        deadline.check()
    raise TimeoutError("fakes not ready by hand")


def _stop_by_hand(procs: list[subprocess.Popen[bytes]]) -> float:
    start = time.perf_counter()
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait(30)
    return time.perf_counter() - start


def _toggle(path: Path, turn: int) -> None:
    """Change one launch key of one instance file (ctx_size, prepended as a top-level key)."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("ctx_size")]
    path.write_text(f"ctx_size = {256 * (turn + 1)}\n" + "\n".join(lines) + "\n")


async def _start_all(names: list[str], sup: Supervisor, clock: StateClock) -> float:
    counts = {n: clock.count(n, "running") + 1 for n in names}
    start = time.perf_counter()
    for n in names:
        sup.start(n)
    return await clock.wait(names, "running", counts, 120) - start


async def run(work: Path, count: int, reps: int) -> list[Row]:
    directory = fake_dir(work / "scale", count)
    names = sorted(load_config(directory).instances)
    cmds = []
    for n in names:
        argv, env, inst = instance(directory, n)
        cmds.append((argv, env, inst.port))
    sup_start, sup_stop, hand_start, hand_stop = [], [], [], []
    reload_apply, reload_ready, restart_stop, restart_ready, changed_pids = [], [], [], [], []
    async with supervised(directory) as (sup, clock):
        for rep in range(reps + 1):  # the first round warms caches and is discarded
            order = ["sup", "hand"] if rep % 2 else ["hand", "sup"]
            for who in order:
                if who == "sup":
                    up = await _start_all(names, sup, clock)
                    t0 = time.perf_counter()
                    await asyncio.gather(*(sup.stop(n) for n in names))
                    down = time.perf_counter() - t0
                    if rep:
                        sup_start.append(up)
                        sup_stop.append(down)
                else:
                    up, procs = _start_by_hand(cmds, work / "scale-hand.log")
                    down = _stop_by_hand(procs)
                    if rep:
                        hand_start.append(up)
                        hand_stop.append(down)
        # Reload: all up, change one file, reload; against restarting that one instance.
        await _start_all(names, sup, clock)
        target = names[len(names) // 2]
        for rep in range(reps):
            before = {s.name: s.pid for s in sup.status()}
            runs = clock.count(target, "running")
            _toggle(directory / f"{target}.toml", rep)
            t0 = time.perf_counter()
            new = await asyncio.to_thread(load_config, directory)
            report = await sup.apply(new, account_for(new))
            t1 = time.perf_counter()
            await clock.wait([target], "running", {target: runs + 1}, 60)
            reload_apply.append(t1 - t0)
            reload_ready.append(clock.last(target, "running") - t0)
            after = {s.name: s.pid for s in sup.status()}
            changed_pids.append(sum(before[n] != after[n] for n in names))
            if report.restarted != [target]:
                raise RuntimeError(f"reload restarted {report.restarted}, expected [{target}]")
            runs = clock.count(target, "running")
            t0 = time.perf_counter()
            await sup.stop(target)
            t1 = time.perf_counter()
            sup.start(target)
            await clock.wait([target], "running", {target: runs + 1}, 60)
            restart_stop.append(t1 - t0)
            restart_ready.append(clock.last(target, "running") - t0)
    ms = 1000.0
    rows = [
        paired(SECTION, f"start-all {count} fake -> all running", "ms",
               [v * ms for v in sup_start], [v * ms for v in hand_start], "by hand: spawn all, poll"),
        paired(SECTION, f"stop-all {count} fake", "ms",
               [v * ms for v in sup_stop], [v * ms for v in hand_stop], "by hand: SIGTERM all, wait"),
        paired(SECTION, f"reload {count}, 1 changed: load+apply returned", "ms",
               [v * ms for v in reload_apply], [v * ms for v in restart_stop],
               "stop() of that one"),
        paired(SECTION, f"reload {count}, 1 changed: changed one running", "ms",
               [v * ms for v in reload_ready], [v * ms for v in restart_ready],
               "stop()+start() of that one"),
        Row(SECTION, f"reload {count}, 1 changed: pids changed", "of " + str(count),
            value=Summary.of([float(c) for c in changed_pids]), goal="exactly 1",
            met=all(c == 1 for c in changed_pids), fmt=".0f"),
    ]
    return rows

