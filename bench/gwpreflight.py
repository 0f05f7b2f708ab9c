"""10. Preflight of an unchanged instance, and starts and respawns with preflight on and off.

a) `run_preflight` of the tiny instance as the daemon's account (root here: the access checks run
   as that account in a child), with everything remembered (an unchanged instance: its second
   and later starts), against the same checks with nothing remembered (`preflightcache.forget`).
b) In one process, two Supervisors on the same instance, one with preflight on and one off,
   started alternately: `start` -> RUNNING; and a respawn: `kill -9` -> RUNNING again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from bench.configs import LLAMA_SERVER
from bench.procs import free_port
from bench.stats import Row, paired
from mi50d.config import load_config
from mi50d.engine.supervisor import Supervisor
from mi50d.host import preflightcache
from mi50d.host.accounts import account_for
from mi50d.host.preflight import run_preflight
from tests.support import Recorder, supervising, write_config

SECTION = "10 preflight"


def _directory(work: Path, model: Path, preflight: bool) -> Path:
    return write_config(work / f"pf-{preflight}", {"llama_server": str(LLAMA_SERVER),
                                                   "preflight": preflight}, {
        "tiny": {"model": str(model), "port": free_port(), "ctx_size": 256, "threads": 1,
                 "n_gpu_layers": 0, "restart": {"delay_s": 0}}})


def checks(work: Path, model: Path, reps: int) -> list[Row]:
    config = load_config(_directory(work, model, True))
    inst, account = config.instances["tiny"], account_for(config)
    warm: list[float] = []
    cold: list[float] = []
    run_preflight(inst, config.daemon, account)
    for _ in range(reps):
        t0 = time.perf_counter()
        failed = [c for c in run_preflight(inst, config.daemon, account) if c.failed]
        warm.append((time.perf_counter() - t0) * 1000)
        preflightcache.forget()
        t0 = time.perf_counter()
        run_preflight(inst, config.daemon, account)
        cold.append((time.perf_counter() - t0) * 1000)
    assert not failed, failed
    who = account.name if account else "self"
    row = paired(SECTION, f"run_preflight, unchanged instance (as {who})",
                 "ms", warm, cold, "nothing remembered", goal="<= 5 ms", fmt=".2f")
    row.met = row.value.median <= 5.0
    return [row]


async def _cycle(work: Path, model: Path, reps: int) -> list[Row]:
    start: dict[bool, list[float]] = {True: [], False: []}
    respawn: dict[bool, list[float]] = {True: [], False: []}
    async with supervising(_directory(work, model, True)) as (on, rec_on), \
            supervising(_directory(work, model, False)) as (off, rec_off):
        pairs: list[tuple[bool, Supervisor, Recorder]] = [(True, on, rec_on),
                                                          (False, off, rec_off)]
        for rep in range(reps + 1):
            for flag, sup, rec in pairs if rep % 2 else pairs[::-1]:
                runs = rec.sequence("tiny").count("running")
                t0 = time.perf_counter()
                sup.start("tiny")
                await rec.wait("tiny", "running", runs + 1)
                took = (time.perf_counter() - t0) * 1000
                pid = sup.get("tiny").pid
                assert pid is not None
                t1 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                await rec.wait("tiny", "running", runs + 2)
                again = (time.perf_counter() - t1) * 1000
                await sup.stop("tiny")
                if rep:
                    start[flag].append(took)
                    respawn[flag].append(again)
    return [paired(SECTION, "tiny: start -> running, preflight on (remembered)", "ms",
                   start[True], start[False], "preflight off"),
            paired(SECTION, "tiny: kill -9 -> running again, preflight on (remembered)", "ms",
                   respawn[True], respawn[False], "preflight off")]


def run(work: Path, model: Path, reps: int) -> list[Row]:
    return checks(work, model, reps * 2) + asyncio.run(_cycle(work, model, reps))
