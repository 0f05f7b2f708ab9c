"""The gateway inside a real `mi50d` process: curl through it starts an on-demand instance,
`mi50ctl status` shows the gateway's URL and each instance's on-demand flag, requests in flight
and last use (table and --json), and a taken port stops the daemon with exit 73."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from tests.ctlsupport import MI50D, running_daemon, server_instance, short_dir
from tests.support import free_port, write_config

pytestmark = pytest.mark.llama


def test_curl_through_the_daemon_and_status_shows_the_gateway(
        request: pytest.FixtureRequest) -> None:
    gport = free_port()
    with running_daemon({"gateway": {"listen": f"127.0.0.1:{gport}"}}, {
            "od": server_instance(request, free_port(), on_demand=True, alias="tiny"),
            "manual": server_instance(request, free_port())}) as d:
        before = json.loads(d.ctl("status", "--json").stdout)
        assert before["daemon"]["gateway"] == f"http://127.0.0.1:{gport}"
        od = next(i for i in before["instances"] if i["name"] == "od")
        assert (od["state"], od["on_demand"], od["in_flight"], od["last_used"]) == (
            "stopped", True, 0, None)
        body = json.dumps({"model": "tiny", "max_tokens": 4,
                           "messages": [{"role": "user", "content": "hi"}]})
        curl = subprocess.run(["curl", "-s", f"http://127.0.0.1:{gport}/v1/chat/completions",
                               "-H", "Content-Type: application/json", "-d", body],
                              capture_output=True, text=True, timeout=120, check=False)
        assert json.loads(curl.stdout)["model"] == "tiny", curl.stdout
        after = json.loads(d.ctl("status", "--json").stdout)
        od = next(i for i in after["instances"] if i["name"] == "od")
        assert od["state"] == "running" and od["last_used"] is not None
        text = d.ctl("status").stdout
        assert f"gateway http://127.0.0.1:{gport}" in text.splitlines()[0]
        header = next(line for line in text.splitlines() if line.startswith("NAME"))
        assert header.split()[9:] == ["ON-DEMAND", "IN-FLIGHT", "LAST-USED", "REASON"]
        rows = {line.split()[0]: line.split() for line in text.splitlines()
                if line.split() and line.split()[0] in ("od", "manual")}
        assert rows["od"][8:10] == ["yes", "0"] and rows["od"][11] == "ago"
        assert rows["manual"][8:11] == ["no", "0", "-"]
        scrape = subprocess.run(["curl", "-s", f"http://127.0.0.1:{gport}/metrics"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert 'mi50d_gateway_requests_total{code="200",model="tiny"} 1.0' in scrape.stdout
        assert d.stop() == 0


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
