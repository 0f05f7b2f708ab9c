"""Hypothesis against the LIVE control socket: random bytes, wrong types, unknown commands,
truncated and oversized lines, and connections closed early or held open. After every example a
normal client must still be served, and at the end the daemon must be alive, with no internal
error logged."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mi50d.control.protocol import COMMANDS, MAX_LINE, ProtocolError, parse_request, request_line
from tests.ctlsupport import Daemon, running_daemon, server_instance
from tests.support import free_port

pytestmark = pytest.mark.llama

HELD_MAX = 40  # half-open connections kept at once; the oldest is closed beyond that


@pytest.fixture(scope="module")
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    with running_daemon({"wait_ready": True}, {
            "a": server_instance(request, free_port(), autostart=True)}) as d:
        yield d


def _is_valid(doc: object) -> bool:
    """True when `doc` is a request the daemon would carry out (never sent: it could act)."""
    try:
        parse_request(json.dumps(doc).encode())
    except (ProtocolError, TypeError, ValueError):
        return False
    return True


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
wrong_requests = st.fixed_dictionaries({
    "v": st.just(1) | values,
    "id": st.integers() | values,
    "command": st.sampled_from(COMMANDS) | st.text(max_size=12),
}, optional={"args": values | st.dictionaries(
    st.sampled_from(["name", "n", "follow", "wait", "timeout_s", "all", "x"]), values,
    max_size=4)}).filter(lambda doc: not _is_valid(doc))
status_line = request_line(1, "status", {"name": "a"})

payloads = st.one_of(
    st.binary(max_size=3000),
    wrong_requests.map(lambda doc: json.dumps(doc).encode() + b"\n"),
    st.integers(1, len(status_line) - 1).map(lambda cut: status_line[:cut]),  # truncated
    st.integers(MAX_LINE + 1, 3 * MAX_LINE).map(  # oversized, with or without its newline
        lambda size: b'{"v":1,"id":1,"command":"status","args":{"name":"' + b"x" * size),
    st.text(min_size=1, max_size=30).filter(lambda c: c not in COMMANDS).map(
        lambda c: json.dumps({"v": 1, "id": 5, "command": c, "args": {}}).encode() + b"\n"),
    st.lists(wrong_requests.map(lambda doc: json.dumps(doc).encode()), min_size=2,
             max_size=5).map(lambda lines: b"\n".join(lines) + b"\n"),  # pipelined
)


def _status_ok(d: Daemon) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(d.socket))
        s.sendall(request_line(7, "status"))
        with s.makefile("rb") as replies:
            reply: dict[str, Any] = json.loads(replies.readline())
    assert reply["ok"] is True and reply["id"] == 7, reply
    return reply


held: list[socket.socket] = []


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(payload=payloads, then=st.sampled_from(["close", "hold", "read"]))
def test_garbage_never_hurts_the_daemon(daemon: Daemon, payload: bytes, then: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(daemon.socket))
    with contextlib.suppress(OSError):  # the daemon may close first (too_large)
        s.sendall(payload)
    if then == "read" and payload.endswith(b"\n"):
        with contextlib.suppress(OSError), s.makefile("rb") as replies:
            line = replies.readline()
            if line:
                frame = json.loads(line)
                assert frame["v"] == 1 and frame["ok"] is False, frame
                assert "Traceback" not in frame["error"]["message"]
    if then == "hold":
        held.append(s)
        if len(held) > HELD_MAX:
            held.pop(0).close()
    else:
        s.close()
    reply = _status_ok(daemon)
    assert [i["state"] for i in reply["result"]["instances"]] == ["running"]


def test_daemon_survived_the_fuzzing(daemon: Daemon) -> None:
    while held:
        held.pop().close()
    assert daemon.proc.poll() is None
    assert _status_ok(daemon)["result"]["daemon"]["pid"] == daemon.proc.pid
    log = daemon.log_text()
    assert "control_command_failed" not in log
    assert "control_connection_failed" not in log
    assert "Traceback" not in log
