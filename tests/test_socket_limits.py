"""A control socket no client can break, against a real mi50d: out of file descriptors on
accept() (the daemon survives, says so to waiting clients, and answers once connections close),
300 connections held by one non-root uid while root and another user are still served, the
one-line "too many clients" refusal, and a reload whose error names a file that is not UTF-8."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from contextlib import ExitStack

from mi50d.control.admission import PER_UID
from tests.ctlsupport import (
    AS_ROOT,
    WAIT_S,
    fake_instance,
    held_follower,
    read_line,
    running_daemon,
    wait_until,
)
from tests.support import free_port

HEADROOM = 8  # descriptors left to the daemon above those it holds when idle

# Run as another uid: open COUNT `logs -f` connections, keep the accepted ones, print what came
# back, then hold them until stdin closes. Standard library only (-I: it cannot import tests).
HOLDER = r"""
import contextlib, json, socket, sys
path, count = sys.argv[1], int(sys.argv[2])
request = json.dumps({"v": 1, "id": 1, "command": "logs",
                      "args": {"name": "a", "n": 0, "follow": True}}).encode() + b"\n"
held, refused = [], []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(request)
    line = b""
    while not line.endswith(b"\n"):
        byte = s.recv(1)
        if not byte:
            break
        line += byte
    frame = json.loads(line)
    if frame["ok"]:
        held.append(s)
    else:
        refused.append(frame["error"])
        s.close()
print(json.dumps({"held": len(held), "refused": refused}), flush=True)
sys.stdin.read()
"""


def test_accept_out_of_file_descriptors_is_survived() -> None:
    with running_daemon({}, {"a": fake_instance(free_port())}) as d, ExitStack() as stack:
        pid = d.proc.pid
        top = max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (top + 1 + HEADROOM, top + 1 + HEADROOM))
        held, refused = [], None
        for _ in range(HEADROOM + 32):  # more than can fit
            sock, frame = held_follower(d.socket, "a")
            if not frame["ok"]:
                refused = frame
                break
            held.append(stack.enter_context(sock))
        assert refused is not None, "the daemon never ran out of descriptors"
        assert 0 < len(held) <= HEADROOM
        assert refused["id"] is None and refused["error"] == {
            "code": "busy", "details": [],
            "message": "mi50d is out of file descriptors (too many open files); try again "
                       "shortly"}
        exhausted = d.ctl("status")
        assert exhausted.returncode == 75, exhausted.stderr
        assert exhausted.stderr.strip() == ("Error: mi50d is busy: mi50d is out of file "
                                            "descriptors (too many open files); try again "
                                            "shortly")
        assert d.proc.poll() is None, d.log_text()

        stack.close()  # every held connection ends: descriptors come back
        wait_until(lambda: d.ctl("status").returncode == 0, "an answer once connections closed")
        assert d.proc.poll() is None
        log = d.log_text()
        assert "control_accept_failed errno=EMFILE" in log
        assert log.count("control_accept_failed errno=EMFILE") == 1  # once per episode
        assert "control_accept_recovered" in log
        assert "Traceback" not in log


@AS_ROOT
def test_300_held_clients_of_one_uid_leave_root_and_others_served() -> None:
    with running_daemon({}, {"a": fake_instance(free_port())}) as d:
        os.chmod(d.workdir, 0o755)
        os.chmod(d.socket, 0o666)  # every local user may connect: the limits are the defence
        with subprocess.Popen(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                 "-I", "-c", HOLDER, str(d.socket), "300"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0) as holder:
            assert holder.stdout is not None and holder.stdin is not None
            summary = json.loads(read_line(holder.stdout))
            expected = (f"too many clients for uid 65534 (limit {PER_UID}); close some mi50ctl "
                        "logs -f")
            assert summary["held"] == PER_UID
            assert len(summary["refused"]) == 300 - PER_UID
            assert {(e["code"], e["message"]) for e in summary["refused"]} == {
                ("too_many_clients", expected)}
            refusals = d.log_text().count("client_refused reason=too_many_clients "
                                          "peer_uid=65534")
            assert refusals == 1  # not one journal line per attempt

            by_root = d.ctl("status")
            assert by_root.returncode == 0, by_root.stderr
            assert by_root.stdout.splitlines()[3].split()[:2] == ["a", "stopped"]
            by_other = d.ctl("status", "--json", user="daemon")  # uid 1: not locked out
            assert by_other.returncode == 0, by_other.stderr
            assert json.loads(by_other.stdout)["instances"][0]["name"] == "a"
            locked = d.ctl("status", user="nobody")
            assert locked.returncode == 77
            assert locked.stderr.strip() == f"Error: mi50d refused the connection: {expected}"

            holder.stdin.close()
            assert holder.wait(timeout=WAIT_S) == 0
            wait_until(lambda: d.ctl("status", user="nobody").returncode == 0,
                       "nobody's connections released")
        assert d.proc.poll() is None
        assert "Traceback" not in d.log_text()


def test_reload_names_a_file_that_is_not_utf8() -> None:
    with running_daemon({}, {"a": fake_instance(free_port())}) as d:
        (d.config / os.fsdecode(b"caf\xe9.toml")).write_text('model = "/dev/null"\n')
        rejected = d.ctl("reload")
        assert rejected.returncode == 78, rejected.stderr
        assert rejected.stderr.splitlines() == [
            "Error: caf\\xe9.toml: file name: instance names are [a-z0-9][a-z0-9._-]*; "
            "rename the file",
            "reload rejected; the running set was kept"]
        # The frame itself is valid UTF-8 JSON with the byte escaped.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(WAIT_S)
            raw.connect(str(d.socket))
            raw.sendall(b'{"v": 1, "id": 5, "command": "reload"}\n')
            reply = json.loads(raw.makefile("rb").readline().decode("utf-8"))
        assert reply["id"] == 5 and reply["error"]["code"] == "config_error"
        assert reply["error"]["details"][0].startswith("caf\\xe9.toml: file name:")
        assert d.ctl("status").returncode == 0  # still serving
        log = d.log_text()
        assert "control_connection_failed" not in log and "Traceback" not in log
