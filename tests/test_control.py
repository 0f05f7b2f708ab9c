"""The control socket at the wire level, against a real mi50d: error codes for each kind of bad
request, oversized and half-sent lines, peer credentials in the log, the socket file's mode,
group, stale and busy cases, and systemd socket activation."""

from __future__ import annotations

import grp
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.ctlsupport import (
    MI50D,
    WAIT_S,
    read_line,
    running_daemon,
    server_instance,
    short_dir,
    start_daemon,
)
from tests.support import free_port, write_config

pytestmark = pytest.mark.llama


class Conn:
    """A raw client: bytes out, frames (parsed JSON) in."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(str(path))
        self.rfile = self.sock.makefile("rb")

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> dict[str, Any]:
        line = self.rfile.readline()
        assert line.endswith(b"\n"), f"connection closed: {line!r}"
        doc: dict[str, Any] = json.loads(line)
        return doc

    def ask(self, data: bytes) -> dict[str, Any]:
        self.send(data)
        return self.frame()

    def closed_by_peer(self) -> bool:
        return self.rfile.readline() == b""


def _error(frame: dict[str, Any]) -> tuple[object, str]:
    assert frame["v"] == 1 and frame["ok"] is False
    return frame["id"], frame["error"]["code"]


def test_error_codes_on_one_connection(request: pytest.FixtureRequest) -> None:
    with running_daemon({}, {"a": server_instance(request, free_port())}) as d:
        c = Conn(d.socket)
        try:
            cases: list[tuple[bytes, tuple[object, str]]] = [
                (b"not json\n", (None, "bad_request")),
                (b"[1, 2]\n", (None, "bad_request")),
                (b'{"v": 1, "id": true, "command": "status"}\n', (None, "bad_request")),
                (b'{"v": "1", "id": 1, "command": "status"}\n', (None, "bad_request")),
                (b'{"v": 2, "id": 2, "command": "status"}\n', (2, "version_mismatch")),
                (b'{"v": 1, "id": 3, "command": "launch"}\n', (3, "unknown_command")),
                (b'{"v": 1, "id": 4, "command": "start"}\n', (4, "bad_request")),
                (b'{"v": 1, "id": 5, "command": "logs", "args": {"name": "a", "n": "3"}}\n',
                 (5, "bad_request")),
                (b'{"v": 1, "id": 6, "command": "stop", "args": {"nmae": "a"}}\n',
                 (6, "bad_request")),
                (b'{"v": 1, "id": 7, "command": "stop", "args": {"name": "zz"}}\n',
                 (7, "unknown_instance")),
                (b'{"v": 1, "id": 8, "command": "status", "args": []}\n', (8, "bad_request")),
            ]
            for data, expected in cases:
                reply = c.ask(data)
                assert _error(reply) == expected, data
                assert "\n" not in reply["error"]["message"]
            unknown = c.ask(b'{"v": 1, "id": 9, "command": "launch"}\n')
            assert unknown["error"]["message"] == (
                "unknown command 'launch'; known: status, start, stop, restart, reload, logs, "
                "check, doctor")
            c.send(b"\n   \n")  # blank lines are skipped
            ok = c.ask(b'{"v": 1, "id": 10, "command": "status"}\n')
            assert ok["id"] == 10 and ok["ok"] is True
            assert [i["name"] for i in ok["result"]["instances"]] == ["a"]
        finally:
            c.close()
        assert "Traceback" not in d.log_text()


def test_oversized_line_is_refused_and_others_still_served(
        request: pytest.FixtureRequest) -> None:
    with running_daemon({}, {"a": server_instance(request, free_port())}) as d:
        big = Conn(d.socket)
        try:
            big.send(b'{"v": 1, "id": 1, "command": "status", "args": {"name": "'
                     + b"x" * 70_000 + b'"}}\n')
            assert _error(big.frame()) == (None, "too_large")
            assert big.closed_by_peer()
        finally:
            big.close()
        other = Conn(d.socket)
        try:
            assert other.ask(b'{"v": 1, "id": 1, "command": "status"}\n')["ok"] is True
        finally:
            other.close()


def test_half_sent_line_neither_blocks_others_nor_stays_open(
        request: pytest.FixtureRequest) -> None:
    with running_daemon({}, {"a": server_instance(request, free_port())}) as d:
        half = Conn(d.socket)
        try:
            half.send(b'{"v": 1, "id": 1, "comm')
            for n in range(3):
                other = Conn(d.socket)
                try:
                    reply = other.ask(b'{"v": 1, "id": %d, "command": "status"}\n' % n)
                    assert reply["id"] == n and reply["ok"] is True
                finally:
                    other.close()
            assert half.closed_by_peer()  # after the daemon's read timeout
        finally:
            half.close()
        assert "control_connection_idle" in d.log_text()


def test_state_changes_are_logged_with_the_peer(request: pytest.FixtureRequest) -> None:
    with running_daemon({}, {"a": server_instance(request, free_port())}) as d:
        c = Conn(d.socket)
        try:
            stopped = c.ask(b'{"v": 1, "id": 1, "command": "stop", "args": {"name": "a"}}\n')
            assert stopped["result"]["instances"][0]["state"] == "stopped"
            assert c.ask(b'{"v": 1, "id": 2, "command": "status"}\n')["ok"] is True
        finally:
            c.close()
        log = d.log_text()
        assert (f'control_command command=stop args={{"name":"a"}} peer_uid={os.getuid()} '
                f"peer_pid={os.getpid()}") in log
        assert "control_command command=status" not in log  # reads are not logged


def test_socket_mode_group_stale_and_busy(request: pytest.FixtureRequest) -> None:
    workdir = short_dir()
    config = write_config(workdir / "cfg", {"preflight": False, "socket_group": "nogroup"},
                          {"a": server_instance(request, free_port())})
    path = workdir / "run" / "ctl.sock"  # the parent is created
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # left behind by a daemon that died: nobody listens
    d = start_daemon(config, workdir, socket_path=path)
    try:
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == grp.getgrnam("nogroup").gr_gid
        assert "stale_socket_removed" in d.log_text()
        busy = subprocess.run([MI50D, "--config-dir", str(config), "--socket", str(path)],
                              capture_output=True, text=True, timeout=WAIT_S, check=False)
        assert busy.returncode == 73
        assert f"another mi50d is already listening on {path}" in busy.stderr
        assert d.ctl("status", "a").returncode == 3  # the first one is unaffected
        assert d.stop() == 0
        assert not path.exists()  # removed on a clean stop

        path.write_text("not a socket")
        blocked = subprocess.run([MI50D, "--config-dir", str(config), "--socket", str(path)],
                                 capture_output=True, text=True, timeout=WAIT_S, check=False)
        assert blocked.returncode == 73
        assert f"{path} exists and is not a socket" in blocked.stderr
    finally:
        d.close()


def test_missing_socket_group_keeps_the_daemons_group(request: pytest.FixtureRequest) -> None:
    with running_daemon({"socket_group": "no-such-group-m5"},
                        {"a": server_instance(request, free_port())}) as d:
        assert d.socket.stat().st_gid == os.getgid()
        assert "socket_group_missing group=no-such-group-m5" in d.log_text()


def test_socket_activation_uses_the_passed_socket(request: pytest.FixtureRequest) -> None:
    workdir = short_dir()
    config = write_config(workdir / "cfg", {"preflight": False},
                          {"a": server_instance(request, free_port())})
    path = workdir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    # A client may connect before mi50d runs: the kernel queues it, as with systemd.
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.settimeout(WAIT_S)
    early.connect(str(path))
    early.sendall(b'{"v": 1, "id": 1, "command": "status"}\n')
    fd = listener.fileno()
    # What systemd does: the socket as fd 3, LISTEN_PID naming the process that execs mi50d.
    shim = [sys.executable, "-c",
            f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
            "os.execv(sys.argv[1], sys.argv[1:])"]
    unused = workdir / "unused.sock"
    d = start_daemon(config, workdir, socket_path=unused, argv_prefix=shim, pass_fds=(fd,))
    try:
        with early.makefile("rb") as replies:
            reply = json.loads(read_line(replies.raw))
        assert reply["result"]["daemon"]["socket"] == str(path)
        assert not unused.exists()
        assert "control_socket_inherited" in d.log_text()
        assert d.stop() == 0
        assert stat.S_ISSOCK(path.stat().st_mode)  # systemd's socket is never unlinked by us
    finally:
        early.close()
        listener.close()
        d.close()
