"""The gateway inside a real `mi50d` process: curl through it starts an on-demand instance,
`mi50ctl status` shows the gateway's URL and each instance's on-demand flag, requests in flight
and last use (table and --json), and a taken port stops the daemon with exit 73; with front
processes (`workers`), the same, and a front killed with SIGKILL is replaced while the other
serves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.ctlsupport import MI50D, Daemon, running_daemon, server_instance, short_dir, wait_until
from tests.support import free_port, write_config

pytestmark = pytest.mark.llama


def curl_chat(gport: int, model: str) -> dict[str, Any]:
    body = json.dumps({"model": model, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}]})
    curl = subprocess.run(["curl", "-s", f"http://127.0.0.1:{gport}/v1/chat/completions",
                           "-H", "Content-Type: application/json", "-d", body],
                          capture_output=True, text=True, timeout=120, check=False)
    doc: dict[str, Any] = json.loads(curl.stdout)
    return doc


def scrape(gport: int) -> str:
    return subprocess.run(["curl", "-s", f"http://127.0.0.1:{gport}/metrics"],
                          capture_output=True, text=True, timeout=60, check=False).stdout


def status_of(d: Daemon, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(i for i in json.loads(d.ctl("status", "--json").stdout)[
        "instances"] if i["name"] == name)
    return found


def fronts_of(pid: int) -> list[int]:
    """The daemon's children that run mi50d.gateway.front."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"mi50d.gateway.front" in cmdline:
                out.append(int(child))
    return sorted(out)


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            out.add(target)
    return out


@pytest.mark.parametrize("workers", [0, 2], ids=["in-daemon", "fronts"])
def test_curl_through_the_daemon_and_status_shows_the_gateway(
        request: pytest.FixtureRequest, workers: int) -> None:
    gport = free_port()
    with running_daemon({"gateway": {"listen": f"127.0.0.1:{gport}", "workers": workers}}, {
            "od": server_instance(request, free_port(), on_demand=True, alias="tiny"),
            "manual": server_instance(request, free_port())}) as d:
        before = json.loads(d.ctl("status", "--json").stdout)
        assert before["daemon"]["gateway"] == f"http://127.0.0.1:{gport}"
        od = next(i for i in before["instances"] if i["name"] == "od")
        assert (od["state"], od["on_demand"], od["in_flight"], od["last_used"]) == (
            "stopped", True, 0, None)
        assert curl_chat(gport, "tiny")["model"] == "tiny"
        # A front reports a finished request to the daemon right after it sent the answer,
        # which can be just after this client read it: re-asked, bounded.
        wait_until(lambda: status_of(d, "od")["last_used"] is not None, "od's last use")
        assert status_of(d, "od")["state"] == "running"
        text = d.ctl("status").stdout
        assert f"gateway http://127.0.0.1:{gport}" in text.splitlines()[0]
        header = next(line for line in text.splitlines() if line.startswith("NAME"))
        assert header.split()[9:] == ["ON-DEMAND", "IN-FLIGHT", "LAST-USED", "REASON"]
        rows = {line.split()[0]: line.split() for line in text.splitlines()
                if line.split() and line.split()[0] in ("od", "manual")}
        assert rows["od"][8:10] == ["yes", "0"] and rows["od"][11] == "ago"
        assert rows["manual"][8:11] == ["no", "0", "-"]
        assert 'mi50d_gateway_requests_total{code="200",model="tiny"} 1.0' in scrape(gport)
        assert fronts_of(d.proc.pid) == [] if not workers else len(fronts_of(d.proc.pid)) == 2
        assert d.stop() == 0
        assert "Traceback" not in d.log_text()


def test_a_killed_front_is_replaced_and_the_other_serves_meanwhile(
        request: pytest.FixtureRequest) -> None:
    gport = free_port()
    with running_daemon({"gateway": {"listen": f"127.0.0.1:{gport}", "workers": 2}}, {
            "a": server_instance(request, free_port(), autostart=True)}) as d:
        wait_until(lambda: status_of(d, "a")["state"] == "running", "a running", 120)
        wait_until(lambda: len(fronts_of(d.proc.pid)) == 2, "two fronts")
        first = fronts_of(d.proc.pid)
        os.kill(first[0], signal.SIGKILL)
        # New connections go to the live front's socket until the new one runs (the killed
        # one's socket stays open in the daemon, so its connections wait instead of failing).
        answers = [curl_chat(gport, "a")["model"] for _ in range(6)]
        assert answers == ["a"] * 6
        wait_until(lambda: len(fronts_of(d.proc.pid)) == 2 and fronts_of(d.proc.pid) != first,
                   "a new front")
        assert first[1] in fronts_of(d.proc.pid)
        wait_until(lambda: 'code="200",model="a"} 6.0' in scrape(gport), "six requests counted")
        assert status_of(d, "a")["in_flight"] == 0
        assert f"gateway_front_exited front=0 pid={first[0]} code=-9" in d.log_text()
        # Each front holds its own listening socket and channel; the instance holds none of
        # them (a leaked copy would keep the gateway's port and a dead front's channel open).
        sockets = [socket_inodes(pid) for pid in fronts_of(d.proc.pid)]
        assert not sockets[0] & sockets[1]
        assert not socket_inodes(status_of(d, "a")["pid"]) & (sockets[0] | sockets[1])
        assert d.stop() == 0
        assert fronts_of(d.proc.pid) == [] if d.proc.poll() is None else True


def test_a_taken_gateway_port_stops_the_daemon_with_73() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        work = short_dir()
        cfg = write_config(work / "cfg", {"gateway": {"listen": f"127.0.0.1:{port}"}}, {})
        done = subprocess.run([MI50D, "--config-dir", str(cfg), "--socket", str(work / "c.sock")],
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 73, done.stderr
    assert f"gateway: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
