"""Many clients that stop reading (`logs -f` on a stalled terminal) must not slow supervision: with
64 of them connected, a flood of llama-server output, a crash and a hang are still handled and
other clients are still answered."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import termios
import urllib.request
from contextlib import ExitStack
from typing import Any

import pytest

from tests.ctlsupport import Daemon, running_daemon, server_instance, wait_until
from tests.support import free_port

pytestmark = pytest.mark.llama

STALLED = 64


def _stalled_follower(path: str) -> socket.socket:
    """A client that asks for `logs -f` and never reads a byte (tiny receive buffer)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(path)
    request = {"v": 1, "id": 1, "command": "logs",
               "args": {"name": "chatty", "n": 100000, "follow": True}}
    sock.sendall(json.dumps(request).encode() + b"\n")
    return sock


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in our receive queue (SIOCINQ)."""
    (count,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))
    return int(count)


def _complete(port: int) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200


def _status(d: Daemon) -> dict[str, Any]:
    doc = json.loads(d.ctl("status", "chatty", "--json").stdout)
    instances: list[dict[str, Any]] = doc["instances"]
    assert len(instances) == 1
    return instances[0]


def test_stalled_log_followers_do_not_slow_supervision(request: pytest.FixtureRequest) -> None:
    port = free_port()
    # Debug verbosity: ~35 lines per request, so the followers' buffers fill for real.
    chatty = server_instance(request, port, autostart=True, args=["--log-verbosity", "4"],
                             health={"interval_s": 0.5, "timeout_s": 0.5, "failures": 2},
                             restart={"delay_s": 0})
    with running_daemon({"wait_ready": True}, {"chatty": chatty}) as d, ExitStack() as stack:
        followers = [stack.enter_context(_stalled_follower(str(d.socket)))
                     for _ in range(STALLED)]
        assert len(followers) == STALLED
        for _ in range(120):  # ~4000 lines, far more than the followers' buffers hold
            _complete(port)
        queued = [_unread(f) for f in followers]
        assert min(queued) >= 1024, "every follower holds a full buffer it never read"
        first = _status(d)
        assert first["state"] == "running"

        # A crash is still noticed and the instance restarted.
        pid = first["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _status(d)["pid"] not in (None, pid) and
                   _status(d)["state"] == "running", "the restart after kill -9")
        assert _status(d)["restarts"] == 1

        # A hang is still detected.
        second = _status(d)["pid"]
        assert isinstance(second, int)
        os.kill(second, signal.SIGSTOP)
        wait_until(lambda: _status(d)["pid"] not in (None, second) and
                   _status(d)["state"] == "running", "the restart after SIGSTOP")
        assert _status(d)["restarts"] == 2
        assert "internal error" not in d.log_text()
        assert d.proc.poll() is None
