"""The races of issue 10 (2a-2e), each forced deterministically: a preflight that blocks until the
test releases it holds the instance in the window where the race happened. Real supervisor, real
fake-server processes; the preflight job is the injected fault."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mi50d.config import load_config
from mi50d.engine.desired import Goal, Kind, Verdict
from mi50d.engine.run import Hooks
from mi50d.engine.supervisor import Supervisor
from mi50d.host.accounts import account_for
from tests.support import Recorder, fake_daemon, fake_env, free_port, supervising, write_config

pytestmark = pytest.mark.asyncio

BOUND_S = 30.0


class Gate:
    """A preflight job that blocks until `open()`; counts the jobs that ran."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.runs = 0

    def open(self) -> None:
        self.event.set()

    def hook(self, *_: Any) -> Any:
        def job() -> None:
            self.runs += 1
            self.event.wait()

        return job


def _write(tmp_path: Path, port: int, **extra: Any) -> Path:
    return write_config(tmp_path, fake_daemon(preflight=True), {"a": {
        "model": "/dev/null", "port": port, "env": fake_env(), **extra}})


@asynccontextmanager
async def _gated(tmp_path: Path, port: int, **extra: Any) -> AsyncIterator[
        tuple[Supervisor, Recorder, Gate]]:
    gate = Gate()
    async with asyncio.timeout(BOUND_S * 4), supervising(_write(tmp_path, port, **extra)) as (
            sup, rec):
        sup.get("a").hooks = Hooks(preflight=gate.hook)
        try:
            yield sup, rec, gate
        finally:
            gate.open()


async def _reload(sup: Supervisor, tmp_path: Path, port: int, **extra: Any) -> asyncio.Task[Any]:
    """Start a reload to the configuration written now; return once it has recorded its
    changes (it runs on, waiting for the stops)."""
    new = load_config(_write(tmp_path, port, **extra))
    task = asyncio.ensure_future(sup.apply(new, account_for(new)))
    await asyncio.sleep(0)  # one step: apply records everything before its first await
    return task


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def test_2a_start_during_a_reload_of_an_instance_in_preflight(tmp_path: Path) -> None:
    port = free_port()
    async with _gated(tmp_path, port) as (sup, rec, gate):
        sup.start("a")
        await rec.wait("a", "starting")  # held in preflight
        reload = await _reload(sup, tmp_path, port, ctx_size=512)
        ticket = sup.start("a")
        gate.open()
        report = await reload
        assert report.restarted == ["a"]
        reply = await ticket.wait(BOUND_S)
        assert reply.verdict is Verdict.REACHED and reply.state == "running"
        pid = sup.status("a")[0].pid
        assert pid is not None and "--ctx-size 512" in _cmdline(pid)
    # leaving the block shut everything down within the bound: nothing hung


async def test_2b_stop_during_a_reload_that_restarts_the_instance_wins(tmp_path: Path) -> None:
    port = free_port()
    async with _gated(tmp_path, port) as (sup, rec, gate):
        gate.open()
        assert (await sup.ensure_running("a", BOUND_S)).ok
        reload = await _reload(sup, tmp_path, port, ctx_size=512)
        stopped = await sup.ensure_stopped("a")
        await reload
        assert stopped.verdict is Verdict.REACHED and stopped.state == "stopped"
        assert sup.get("a").goal is Goal.DOWN
        again = await sup.ensure_stopped("a")  # one more turn of its loop: still down
        assert again.ok and sup.status("a")[0].pid is None
        seq = rec.sequence("a")
        assert seq[-1] == "stopped" and "starting" not in seq[seq.index("stopping"):]


async def test_2c_stop_overtaken_by_a_start_during_preflight(tmp_path: Path) -> None:
    port = free_port()
    async with _gated(tmp_path, port) as (sup, rec, gate):
        sup.start("a")
        await rec.wait("a", "starting")
        stop = sup.get("a").request(Kind.STOP)
        start = sup.start("a")
        reply = await stop.wait(BOUND_S)
        assert reply.verdict is Verdict.SUPERSEDED and "later start" in reply.reason
        gate.open()
        assert (await start.wait(BOUND_S)).verdict is Verdict.REACHED


async def test_2d_start_survives_a_reload_mid_start(tmp_path: Path) -> None:
    port = free_port()
    async with _gated(tmp_path, port, env=fake_env(FAKE_LOAD_S=0.5)) as (sup, rec, gate):
        gate.open()
        ticket = sup.start("a")
        await rec.wait("a", "starting")
        await (await _reload(sup, tmp_path, port, ctx_size=512,
                             env=fake_env(FAKE_LOAD_S=0.5)))
        reply = await ticket.wait(BOUND_S)
        assert reply.verdict is Verdict.REACHED and reply.state == "running"
        assert sup.get("a").config.ctx_size == 512


async def test_2e_stop_during_preflight_spawns_nothing(tmp_path: Path) -> None:
    port = free_port()
    async with _gated(tmp_path, port) as (sup, rec, gate):
        sup.start("a")
        await rec.wait("a", "starting")
        reply = await sup.ensure_stopped("a")
        assert reply.verdict is Verdict.REACHED and reply.state == "stopped"
        gate.open()  # the job now finishes; its answer must be ignored
        assert (await sup.ensure_stopped("a")).ok
        assert rec.sequence("a") == ["stopped", "starting", "stopped"]
        (st,) = sup.status("a")
        assert st.last_exit is None and st.pid is None and not sup.get("a").lines


async def test_stop_during_a_long_load_cuts_it_short(tmp_path: Path) -> None:
    port = free_port()
    async with _gated(tmp_path, port, env=fake_env(FAKE_LOAD_S=300)) as (sup, rec, gate):
        gate.open()
        with sup.events.subscribe() as sub:
            sup.start("a")
            while (await sub.get())["event"] != "line":  # spawned: it printed
                pass
        reply = await sup.ensure_stopped("a")
        assert reply.ok and rec.sequence("a") == ["stopped", "starting", "stopping", "stopped"]


async def test_restart_of_a_running_instance_replies_once_the_new_attempt_began(
        tmp_path: Path) -> None:
    port = free_port()
    async with _gated(tmp_path, port) as (sup, rec, gate):
        gate.open()
        assert (await sup.ensure_running("a", BOUND_S)).ok
        first = sup.status("a")[0].pid
        reply = await sup.restart("a")
        assert reply.verdict is Verdict.REACHED and reply.state == "starting"
        assert (await sup.ensure_running("a", BOUND_S)).ok
        assert sup.status("a")[0].pid not in (None, first)
        assert rec.sequence("a") == ["stopped", "starting", "running", "stopping", "stopped",
                                     "starting", "running"]


async def test_a_start_that_times_out_keeps_the_request(tmp_path: Path) -> None:
    port = free_port()
    async with _gated(tmp_path, port) as (sup, rec, gate):
        reply = await sup.ensure_running("a", timeout_s=0.05)
        assert reply.verdict is Verdict.TIMEOUT and reply.state == "starting"
        gate.open()
        await rec.wait("a", "running")
        assert sup.get("a").goal is Goal.UP


async def test_a_stop_wins_over_a_start_that_came_before_it(tmp_path: Path) -> None:
    port = free_port()
    async with _gated(tmp_path, port, env=fake_env(FAKE_LOAD_S=300)) as (sup, rec, gate):
        gate.open()
        starts = [sup.start("a") for _ in range(3)]  # three clients waiting for it
        await rec.wait("a", "starting")
        stopped = await sup.ensure_stopped("a")
        assert stopped.ok and stopped.state == "stopped"
        for ticket in starts:
            reply = await ticket.wait(BOUND_S)
            assert reply.verdict is Verdict.SUPERSEDED and "later stop" in reply.reason
        assert sup.get("a").goal is Goal.DOWN and sup.status("a")[0].pid is None
