"""mi50ctl's exit codes tell the failures apart, each against a real mi50d (or a real socket): 69
mi50d not reachable, 75 no reply in time (a stopped daemon), 76 another protocol, 77 no
permission on the socket (with the socket's own group in the hint), 2 arguments outside the
protocol's bounds (never a traceback). The too-many-clients refusal (77) is in
tests/test_socket_limits.py."""

from __future__ import annotations

import os
import signal
import socket
import threading

from tests.ctlsupport import AS_ROOT, WAIT_S, fake_instance, mi50ctl, running_daemon, short_dir
from tests.support import free_port


def test_daemon_not_running_is_69() -> None:
    path = short_dir() / "none.sock"
    result = mi50ctl("--socket", str(path), "status")
    assert result.returncode == 69
    assert result.stderr.strip() == (f"Error: mi50d is not running (no socket at {path}); "
                                     "start it: systemctl start mi50d")


def test_no_reply_in_time_is_75_and_the_daemon_serves_after() -> None:
    with running_daemon({}, {"a": fake_instance(free_port())}) as d:
        os.kill(d.proc.pid, signal.SIGSTOP)  # the kernel still queues connections
        try:
            stuck = d.ctl("--reply-timeout", "1", "status")
            by_env = mi50ctl("--socket", str(d.socket), "status",
                             env={"MI50CTL_REPLY_TIMEOUT": "1"})
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        assert stuck.returncode == 75, stuck.stderr
        assert stuck.stderr.strip() == (
            f"Error: no reply from mi50d within 1s on {d.socket} (it is stuck or overloaded; "
            "its journal says more: journalctl -u mi50d)")
        assert by_env.returncode == 75
        assert d.ctl("status").returncode == 0


def test_another_protocol_is_76() -> None:
    path = short_dir() / "other.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(WAIT_S)

        def answer() -> None:  # a future mi50d: protocol 2
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as lines:
                lines.readline()
                conn.sendall(b'{"v": 2, "id": 1, "ok": true, "result": {}}\n')

        peer = threading.Thread(target=answer)
        peer.start()
        result = mi50ctl("--socket", str(path), "status")
        peer.join()
    assert result.returncode == 76
    assert result.stderr.strip() == ("Error: mi50d speaks protocol 2, this mi50ctl 1; install "
                                     "matching versions")


@AS_ROOT
def test_permission_denied_is_77_and_names_the_sockets_group() -> None:
    with running_daemon({"socket_group": "daemon"}, {"a": fake_instance(free_port())}) as d:
        os.chmod(d.workdir, 0o755)  # nobody may reach the socket, not use it: mode 0660, group daemon
        denied = d.ctl("status", user="nobody")
        assert denied.returncode == 77, denied.stderr
        assert denied.stderr.strip() == (
            f"Error: permission denied on {d.socket}; join the group: "
            "sudo usermod -aG daemon $USER, then log in again")
        member = d.ctl("status", user="daemon")  # in the group: served
        assert member.returncode == 0, member.stderr


def test_arguments_beyond_the_protocol_are_usage_errors() -> None:
    with running_daemon({}, {"a": fake_instance(free_port())}) as d:
        long_name = "a" * 201
        cases = [
            (("start", "a", "--timeout", "1e9"), "Invalid value for '--timeout'"),
            (("restart", "a", "--timeout", "1e9"), "Invalid value for '--timeout'"),
            (("start", long_name), "an instance name has 1 to 200 characters, not 201"),
            (("status", long_name), "an instance name has 1 to 200 characters, not 201"),
            (("logs", long_name), "an instance name has 1 to 200 characters, not 201"),
            (("check", long_name), "an instance name has 1 to 200 characters, not 201"),
            (("--reply-timeout", "0", "status"), "Invalid value for '--reply-timeout'"),
        ]
        for args, message in cases:
            result = d.ctl(*args)
            assert result.returncode == 2, (args, result.stderr)
            assert message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr
        assert "control_command" not in d.log_text()  # nothing reached the daemon
