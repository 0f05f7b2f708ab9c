"""The whole instance is stopped, not only its leader: a grandchild that ignores SIGTERM and
outlives the leader (it keeps the listening socket, as a llama-server helper would) is killed on
stop, on a crash before the restart (which would otherwise fail on the port), and on the daemon's
SIGTERM. Real processes, real signals, the fake server's FAKE_GRANDCHILD mode."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from pathlib import Path

import pytest

from mi50d.engine.process import group_members
from mi50d.engine.supervisor import Supervisor
from tests.ctlsupport import fake_instance, running_daemon, wait_until
from tests.support import fake_daemon, fake_env, free_port, supervising, write_config

BOUND_S = 60.0


def _alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _grandchild_of(lines: list[str]) -> int:
    for line in lines:
        found = re.search(r"grandchild pid (\d+)", line)
        if found:
            return int(found.group(1))
    raise AssertionError(f"no grandchild pid in {lines}")


async def _grandchild(sup: Supervisor, name: str, count: int = 1) -> int:
    """The pid of the `count`-th grandchild `name` printed (waits on its output lines)."""
    with sup.events.subscribe(size=10_000) as sub:
        async with asyncio.timeout(BOUND_S):
            while True:
                found = [line for line in sup.get(name).lines if "grandchild pid" in line]
                if len(found) >= count:
                    return _grandchild_of(found[count - 1:])
                await sub.get()


@pytest.mark.asyncio
async def test_stop_kills_a_grandchild_that_ignores_sigterm(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_daemon(), {"g": {
        "model": "/dev/null", "port": free_port(), "autostart": True,
        "env": fake_env(FAKE_GRANDCHILD=1), "stop": {"timeout_s": 0.5}}})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("g", "running")
        leader = sup.status("g")[0].pid
        assert leader is not None
        grandchild = await _grandchild(sup, "g")
        assert grandchild in group_members(leader, leader)
        reply = await sup.ensure_stopped("g")
        assert reply.ok and reply.state == "stopped"
        assert not _alive(grandchild)
        assert group_members(leader) == []


@pytest.mark.asyncio
async def test_crash_restart_kills_the_grandchild_before_the_respawn(tmp_path: Path) -> None:
    """The grandchild holds the port: were it alive, the second start would fail to bind."""
    cfg = write_config(tmp_path, fake_daemon(), {"g": {
        "model": "/dev/null", "port": free_port(), "autostart": True,
        "env": fake_env(FAKE_GRANDCHILD=1, FAKE_EXIT_AFTER_S=0.3), "stop": {"timeout_s": 0.5},
        "restart": {"delay_s": 0, "burst": 5}}})
    async with supervising(cfg) as (sup, rec):
        first = await _grandchild(sup, "g", 1)
        seq = await rec.wait("g", "running", count=2)
        assert seq[:6] == ["stopped", "starting", "running", "backoff", "starting", "running"]
        assert not _alive(first)
        assert not any("Address already in use" in line for line in sup.get("g").lines)


def test_daemon_sigterm_kills_the_grandchild() -> None:
    port = free_port()
    with running_daemon({}, {"g": fake_instance(port, autostart=True, stop={"timeout_s": 1},
                                                env={"FAKE_GRANDCHILD": "1"})}) as daemon:
        wait_until(lambda: "grandchild pid" in daemon.log_text(), "the grandchild's line")
        grandchild = _grandchild_of(daemon.log_text().splitlines())
        assert _alive(grandchild)
        assert daemon.stop() == 0
        assert not _alive(grandchild)


def test_second_sigterm_stops_fast() -> None:
    """An instance that ignores SIGTERM with a long stop timeout: the second SIGTERM kills it
    now instead of after the timeout (the daemon exits 0 long before 120 s)."""
    port = free_port()
    inst = fake_instance(port, autostart=True, stop={"timeout_s": 120},
                         env={"FAKE_IGNORE_TERM": "1"})
    with running_daemon({"wait_ready": True}, {"slow": inst}) as daemon:
        wait_until(lambda: "new=running" in daemon.log_text(), "running")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "new=stopping" in daemon.log_text(), "stopping")
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            code = daemon.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("a second SIGTERM did not stop the daemon fast") from None
        assert code == 0
        log = daemon.log_text()
        assert "daemon_stopping_fast" in log
        pid = int(re.search(r"instance_spawned instance=slow pid=(\d+)", log).group(1))  # type: ignore[union-attr]
        assert not _alive(pid)
