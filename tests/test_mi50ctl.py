"""`mi50ctl` as a user runs it, against a real mi50d on a real socket: status table, JSON and exit
codes, start with progress, stop, restart, reload (changed and broken files), logs, the errors
for a missing daemon and a socket without permission, and a light import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.ctlsupport import (
    MI50CTL,
    WAIT_S,
    fake_instance,
    read_line,
    running_daemon,
    server_instance,
    short_dir,
    write_instance,
)
from tests.support import free_port


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _refused(port: int) -> bool:
    try:
        _health(port)
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, ConnectionRefusedError)
    return False


def _status(daemon_ctl: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    doc = json.loads(daemon_ctl.stdout)
    return {st["name"]: st for st in doc["instances"]}


@pytest.mark.llama
def test_status_table_json_and_exit_codes(request: pytest.FixtureRequest) -> None:
    up, idle = free_port(), free_port()
    with running_daemon({"wait_ready": True}, {
        "up": server_instance(request, up, autostart=True, gpus=[0]),
        "idle": server_instance(request, idle),
    }) as d:
        every = d.ctl("status")
        assert every.returncode == 0, every.stderr
        lines = every.stdout.splitlines()
        assert lines[0].startswith("mi50d 0.1.0  pid ")
        assert f"socket {d.socket}" in lines[0]
        header = lines[2]
        assert header.split() == ["NAME", "STATE", "PID", "ENDPOINT", "UPTIME", "RESTARTS",
                                  "LAST", "EXIT", "GPUS", "REASON"]
        rows = {line.split()[0]: line for line in lines[3:]}
        assert sorted(rows) == ["idle", "up"]
        assert rows["up"].split()[1:2] + rows["up"].split()[3:4] == ["running", f"127.0.0.1:{up}"]
        assert rows["up"].split()[7] == "0"  # GPUS
        assert rows["idle"].split()[1:3] == ["stopped", "-"]
        assert rows["idle"].endswith("not started")  # the reason, last
        # Aligned: every column starts where its header does.
        for column in ("STATE", "ENDPOINT", "GPUS"):
            at = header.index(column)
            assert all(row[at - 2: at] == "  " and row[at] != " " for row in rows.values())

        one = d.ctl("status", "up")
        assert one.returncode == 0
        assert one.stdout.splitlines()[0].startswith("NAME")  # no daemon line for one instance
        assert d.ctl("status", "idle").returncode == 3
        unknown = d.ctl("status", "nope")
        assert unknown.returncode == 4
        assert "no instance named 'nope'" in unknown.stderr

        as_json = d.ctl("status", "--json")
        assert as_json.returncode == 0
        doc = json.loads(as_json.stdout)
        assert doc["daemon"]["pid"] == d.proc.pid
        assert doc["daemon"]["config_dir"] == str(d.config)
        st = _status(as_json)
        assert st["up"]["state"] == "running" and st["up"]["endpoint"] == f"http://127.0.0.1:{up}"
        assert st["idle"]["state"] == "stopped" and st["idle"]["pid"] is None

    gone = d.ctl("status")
    assert gone.returncode == 69
    assert gone.stderr.strip() == (f"Error: mi50d is not running (no socket at {d.socket}); "
                                   "start it: systemctl start mi50d")


@pytest.mark.llama
def test_start_waits_until_running_then_stop(request: pytest.FixtureRequest) -> None:
    port = free_port()
    with running_daemon({}, {"tiny": server_instance(request, port)}) as d:
        started = d.ctl("start", "tiny")
        assert started.returncode == 0, started.stderr
        out = started.stdout.splitlines()
        assert out[0].startswith("tiny: starting")  # progress, one plain line per change
        assert out[-1].startswith(f"tiny running: http://127.0.0.1:{port} (ready in ")
        assert _health(port) == 200
        again = d.ctl("start", "tiny")  # already running: answers at once
        assert again.returncode == 0 and again.stdout.startswith("tiny running: ")

        stopped = d.ctl("stop", "tiny")
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.startswith("tiny: stopped; now stopped (last exit: ")
        assert _refused(port)
        assert d.ctl("status", "tiny").returncode == 3
        assert "control_command command=stop" in d.log_text()

        usage = d.ctl("stop")
        assert usage.returncode == 2 and "give an instance NAME or --all" in usage.stderr


def test_start_failure_shows_reason_diagnosis_and_last_lines() -> None:
    line = "llama_model_load: error loading model: tensor 'x' data is not within the file bounds"
    with running_daemon({}, {"broken": fake_instance(
            free_port(), env={"FAKE_LOAD_S": 0.1, "FAKE_FAIL_LOAD": line},
            restart={"policy": "never"})}) as d:
        result = d.ctl("start", "broken")
        assert result.returncode == 1
        assert "broken failed: exited during start (exit 1)" in result.stderr
        assert "last output:" in result.stderr
        assert f"  {line}" in result.stderr.splitlines()


@pytest.mark.llama
def test_start_no_wait_and_restart(request: pytest.FixtureRequest) -> None:
    port = free_port()
    with running_daemon({"wait_ready": True}, {"r": server_instance(request, port,
                                                                   autostart=True)}) as d:
        before = _status(d.ctl("status", "--json"))["r"]["pid"]
        restarted = d.ctl("restart", "r")
        assert restarted.returncode == 0, restarted.stderr
        assert restarted.stdout.splitlines()[-1].startswith(f"r running: http://127.0.0.1:{port}")
        after = _status(d.ctl("status", "--json"))["r"]
        assert after["state"] == "running" and after["pid"] not in (None, before)

        assert d.ctl("stop", "--all").returncode == 0
        requested = d.ctl("start", "r", "--no-wait")
        assert requested.returncode == 0
        assert requested.stdout.startswith("r: start requested; now ")
        assert d.ctl("start", "r").returncode == 0  # waits for the start already under way
        assert _health(port) == 200


@pytest.mark.llama
def test_reload_restarts_only_the_changed_instance(request: pytest.FixtureRequest) -> None:
    a, b = free_port(), free_port()
    with running_daemon({"wait_ready": True}, {
        "a": server_instance(request, a, autostart=True),
        "b": server_instance(request, b, autostart=True),
    }) as d:
        pids = {n: st["pid"] for n, st in _status(d.ctl("status", "--json")).items()}
        write_instance(d.config, "b", server_instance(request, b, autostart=True, temp=0.5))
        reloaded = d.ctl("reload")
        assert reloaded.returncode == 0, reloaded.stderr
        report = {line.split(":")[0].strip(): line.split(":", 1)[1].strip()
                  for line in reloaded.stdout.splitlines()[1:]}
        assert report == {"added": "-", "removed": "-", "restarted": "b", "untouched": "a"}
        assert d.ctl("start", "b").returncode == 0
        now = _status(d.ctl("status", "--json"))
        assert now["a"]["pid"] == pids["a"]
        assert now["b"]["pid"] != pids["b"] and now["b"]["state"] == "running"


@pytest.mark.llama
def test_reload_with_a_broken_file_keeps_the_running_set(request: pytest.FixtureRequest) -> None:
    port = free_port()
    with running_daemon({"wait_ready": True}, {"a": server_instance(request, port,
                                                                   autostart=True)}) as d:
        before = _status(d.ctl("status", "--json"))["a"]
        (d.config / "a.toml").write_text(f"model = \"/dev/null\"\nport = 70000\n"
                                         f"# was on {port}\n")
        (d.config / "new.toml").write_text("prot = 1\n")
        rejected = d.ctl("reload")
        assert rejected.returncode == 78
        err = rejected.stderr.splitlines()
        assert "a.toml: port: Input should be less than or equal to 65535" in err[0]
        assert "new.toml: prot: unknown key; did you mean 'port'?" in err
        assert "new.toml: port: required key is missing; add `port = ...`" in err
        assert err[-1] == "reload rejected; the running set was kept"
        after = _status(d.ctl("status", "--json"))
        assert list(after) == ["a"]
        assert after["a"]["state"] == "running" and after["a"]["pid"] == before["pid"]
        assert _health(port) == 200


@pytest.mark.llama
def test_logs_last_lines_and_follow(request: pytest.FixtureRequest) -> None:
    port = free_port()
    with running_daemon({"wait_ready": True}, {"a": server_instance(request, port,
                                                                   autostart=True)}) as d:
        every = d.ctl("logs", "a", "-n", "100000").stdout.splitlines()
        assert len(every) >= 2
        last = d.ctl("logs", "a", "-n", "1")
        assert last.returncode == 0
        assert last.stdout.splitlines() == every[-1:]
        assert d.ctl("logs", "a", "-n", "0").stdout == ""
        assert d.ctl("logs", "nope").returncode == 4

        with subprocess.Popen([MI50CTL, "--socket", str(d.socket), "logs", "a", "-n", "1", "-f"],
                              stdout=subprocess.PIPE, bufsize=0) as follower:
            assert follower.stdout is not None
            assert read_line(follower.stdout) == every[-1] + "\n"  # the backlog first
            assert d.ctl("restart", "a").returncode == 0  # the new process prints new lines
            fresh = d.ctl("logs", "a", "-n", "100000").stdout.splitlines()[len(every):]
            assert fresh
            assert [read_line(follower.stdout).rstrip("\n") for _ in fresh] == fresh
            follower.terminate()


@pytest.mark.llama
def test_permission_denied_names_the_group(request: pytest.FixtureRequest) -> None:
    with running_daemon({}, {"a": server_instance(request, free_port())}) as d:
        os.chmod(d.workdir, 0o755)  # nobody may reach the socket, not use it
        os.chmod(d.socket, 0o600)
        denied = d.ctl("status", user="nobody")
        assert denied.returncode == 77, denied.stderr  # refused, not unreachable
        assert denied.stderr.strip() == (
            f"Error: permission denied on {d.socket}; join the group: "
            "sudo usermod -aG mi50d $USER, then log in again")
        assert d.ctl("status", "a").returncode == 3  # root still gets through


def test_daemon_not_running_message_for_a_stale_socket() -> None:
    import socket

    path = short_dir() / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # a socket file nobody listens on
    result = subprocess.run([MI50CTL, "status"], capture_output=True, text=True, check=False,
                            env={**os.environ, "MI50D_SOCKET": str(path)}, timeout=WAIT_S)
    assert result.returncode == 69
    assert f"mi50d is not running (nothing listens at {path})" in result.stderr


HEAVY = ("mi50d.engine.supervisor", "mi50d.engine.instance", "mi50d.daemon",
         "mi50d.control.server", "mi50d.config", "uvloop", "pydbus", "asyncio")


def test_mi50ctl_imports_nothing_heavy() -> None:
    probe = ("import json, sys\n"
             "from mi50ctl.cli import cli\n"
             "for args in (['--help'], ['status', '--help'], ['logs', '--help']):\n"
             "    try:\n"
             "        cli(args)\n"
             "    except SystemExit:\n"
             "        pass\n"
             "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=WAIT_S)
    loaded = set(json.loads(done.stderr.splitlines()[-1]))
    assert "mi50d.control.protocol" in loaded
    assert sorted(m for m in loaded if m.startswith(HEAVY)) == []
    assert "status" in done.stdout and "--socket PATH" in done.stdout
