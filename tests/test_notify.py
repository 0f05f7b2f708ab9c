"""systemd notifications from a real mi50d, received on a real AF_UNIX datagram socket standing in
for NOTIFY_SOCKET: the READY/STATUS/RELOADING/READY/STOPPING sequence, watchdog pings that stop
while the daemon is frozen (SIGSTOP), wait_ready, and children that never see the variables."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.ctlsupport import (
    Daemon,
    fake_instance,
    fields,
    process_state,
    server_instance,
    short_dir,
    start_daemon,
    wait_until,
)
from tests.support import free_port, write_config

SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def _daemon(instances: dict[str, dict[str, object]], env: dict[str, str],
            **settings: object) -> Daemon:
    workdir = short_dir()
    config = write_config(workdir / "cfg", {"preflight": False, **settings}, instances)
    return start_daemon(config, workdir, env)


def _kind(message: str) -> str | None:
    """The lifecycle part of a message (READY, RELOADING, STOPPING), None for pings and STATUS."""
    for key in ("READY", "RELOADING", "STOPPING"):
        if f"{key}=1" in message.splitlines():
            return key
    return None


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.mark.llama
def test_notification_sequence(request: pytest.FixtureRequest) -> None:
    port = free_port()
    d = _daemon({"a": server_instance(request, port, autostart=True)},
                {"WATCHDOG_USEC": "200000"})
    n = d.notify
    try:
        first = next(m for m in n.messages if _kind(m))
        assert _kind(first) == "READY" and "STATUS" in fields(first)
        n.wait_for(lambda m: fields(m).get("STATUS") == "1/1 running")
        n.wait_for(lambda m: m == "WATCHDOG=1")
        n.wait_for(lambda m: m == "WATCHDOG=1")

        def reload_by(trigger: str) -> None:
            before = _monotonic_usec()
            if trigger == "SIGHUP":
                d.proc.send_signal(signal.SIGHUP)
            else:
                assert d.ctl("reload").returncode in (0, 78)
            reloading = n.wait_for(lambda m: _kind(m) == "RELOADING")
            stamp = int(fields(reloading)["MONOTONIC_USEC"])
            assert before <= stamp <= _monotonic_usec()
            ready = n.wait_for(lambda m: _kind(m) is not None)
            assert _kind(ready) == "READY"
            assert fields(ready)["STATUS"] == "1/1 running"

        reload_by("SIGHUP")
        reload_by("mi50ctl")
        (d.config / "broken.toml").write_text("port = 1\n")
        reload_by("mi50ctl")  # rejected: still RELOADING then READY, the set kept

        d.proc.send_signal(signal.SIGTERM)
        stopping = n.wait_for(lambda m: _kind(m) is not None)
        assert _kind(stopping) == "STOPPING"
        assert fields(stopping)["STATUS"].startswith("stopping; ")
        assert d.proc.wait(timeout=60) == 0
        n.drain()
        assert [k for m in n.messages if (k := _kind(m))] == [
            "READY", "RELOADING", "READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"]
    finally:
        d.close()


def test_watchdog_pings_stop_while_the_daemon_is_frozen() -> None:
    d = _daemon({}, {"WATCHDOG_USEC": "100000"})  # a ping every 50 ms
    try:
        d.notify.wait_for(lambda m: m == "WATCHDOG=1")
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: process_state(d.proc.pid) == "T", "the daemon to stop")
            d.notify.drain()  # pings sent before it stopped
            # Twenty ping intervals without a single ping.
            assert d.notify.receive(timeout=1.0) is None
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        d.notify.wait_for(lambda m: m == "WATCHDOG=1")  # and back once it runs again
    finally:
        d.close()


def test_no_watchdog_for_another_pid() -> None:
    d = _daemon({}, {"WATCHDOG_USEC": "20000", "WATCHDOG_PID": "1"})
    try:
        assert d.ctl("status").returncode == 0
        assert d.stop() == 0
        d.notify.drain()
    finally:
        d.close()
    assert "WATCHDOG=1" not in d.notify.messages
    assert _kind(d.notify.messages[-1]) == "STOPPING"


def test_wait_ready_announces_once_autostart_instances_settle() -> None:
    line = "llama_model_load: error loading model: unknown model architecture: 'x'"
    d = _daemon({
        "slow": fake_instance(free_port(), autostart=True, env={"FAKE_LOAD_S": 0.5}),
        "bad": fake_instance(free_port(), autostart=True, restart={"policy": "never"},
                             env={"FAKE_FAIL_LOAD": line}),
        "manual": fake_instance(free_port()),
    }, {}, wait_ready=True)
    try:
        lifecycle = [m for m in d.notify.messages if _kind(m) or "EXTEND_TIMEOUT_USEC" in m]
        assert fields(lifecycle[0])["EXTEND_TIMEOUT_USEC"] == "30000000"
        ready = lifecycle[-1]
        assert _kind(ready) == "READY"
        assert fields(ready)["STATUS"].startswith("1/3 running; bad failed ")
    finally:
        d.close()


@pytest.mark.llama
def test_children_do_not_inherit_systemd_variables(request: pytest.FixtureRequest) -> None:
    d = _daemon({"a": server_instance(request, free_port(), autostart=True)},
                {"WATCHDOG_USEC": "60000000", "LISTEN_FDS": "1", "LISTEN_PID": "1"},
                wait_ready=True)
    try:
        status = d.ctl("status", "--json")
        pid = json.loads(status.stdout)["instances"][0]["pid"]
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0].decode() for entry in env if entry}
        assert "PATH" in names  # it is a real environment ...
        assert names.isdisjoint(SYSTEMD_VARS)  # ... without systemd's variables
        daemon_env = Path(f"/proc/{d.proc.pid}/environ").read_bytes()
        assert b"NOTIFY_SOCKET=" in daemon_env  # the daemon did get them
    finally:
        d.close()

