"""Two hosts on this machine (issue 14): network namespaces W and M joined by a veth pair, and X,
a third host that W can reach but whose address `allow` does not list. W runs mi50d with an
rpc-worker (CPU backend) on 0.0.0.0, M runs mi50d with a llama-server instance split over it.
Every part is real: ip, nft, mi50d, ggml-rpc-server, llama-server and curl.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ctlsupport import Daemon, short_dir, start_daemon, wait_until
from tests.support import write_config

pytestmark = [
    pytest.mark.llama,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="network namespaces need root and iproute2"),
]

PORT = 50052
LINKS = {  # (namespace a, address a, namespace b, address b)
    "m": ("W", "10.77.0.2", "M", "10.77.0.1"),
    "x": ("W", "10.78.0.2", "X", "10.78.0.3"),
}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    """{"W": netns name, "M": ..., "X": ...}, removed afterwards."""
    tag = f"m5{os.getpid() % 100000}"
    names = {h: f"{tag}{h}" for h in ("W", "M", "X")}
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for link, (a, addr_a, b, addr_b) in LINKS.items():
            va, vb = f"{tag}{link}a", f"{tag}{link}b"
            _ip("link", "add", va, "netns", names[a], "type", "veth", "peer", "name", vb,
                "netns", names[b])
            _ip("-n", names[a], "addr", "add", f"{addr_a}/24", "dev", va)
            _ip("-n", names[b], "addr", "add", f"{addr_b}/24", "dev", vb)
            _ip("-n", names[a], "link", "set", va, "up")
            _ip("-n", names[b], "link", "set", vb, "up")
        yield names
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _daemon(ns: str, instances: dict[str, dict[str, Any]]) -> Daemon:
    workdir = short_dir()
    config = write_config(workdir / "cfg", {"preflight": True, "user": "root"}, instances)
    return start_daemon(config, workdir, argv_prefix=["ip", "netns", "exec", ns])


def _status(d: Daemon, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(d.ctl("status", "--json", name).stdout)
    inst: dict[str, Any] = doc["instances"][0] if "instances" in doc else doc
    return inst


def _state(d: Daemon, name: str) -> str:
    return str(_status(d, name).get("state"))


def _in(ns: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


HELLO_FROM = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\n"
    "except ConnectionRefusedError:\n"
    "    print('refused')\n"
    "except OSError as exc:\n"
    "    print(type(exc).__name__)\n"
    "else:\n"
    "    print('connected')\n")


def test_model_split_over_a_worker_on_another_host(hosts: dict[str, str], rpc_bin: Path,
                                                   tiny_model: Path, tmp_path: Path) -> None:
    rpc_server, llama_server = rpc_bin / "ggml-rpc-server", rpc_bin / "llama-server"
    w = _daemon(hosts["W"], {"w": {"kind": "rpc-worker", "host": "0.0.0.0", "port": PORT,
                                   "allow": ["10.77.0.1"], "rpc_server": str(rpc_server),
                                   "autostart": True}})
    m: Daemon | None = None
    try:
        wait_until(lambda: _state(w, "w") == "running", "the worker runs in W")
        table = _in(hosts["W"], "nft", "list", "table", "inet", "mi50d_w")
        assert table.returncode == 0, table.stderr
        assert "ip saddr { 10.77.0.1, 127.0.0.0/8 } accept" in table.stdout
        # X reaches W (a listener on another port of W takes its connection), but the worker's
        # port answers it with a reset.
        with subprocess.Popen(
                ["ip", "netns", "exec", hosts["W"], "python3", "-c",
                 "import socket, sys; s = socket.create_server(('0.0.0.0', 50053)); "
                 "print('up', flush=True); sys.stdin.read()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as listener:
            try:
                assert listener.stdout is not None and listener.stdout.readline() == "up\n"
                other = _in(hosts["X"], "python3", "-c", HELLO_FROM, "10.78.0.2", "50053")
                assert other.stdout.strip() == "connected", other
            finally:
                listener.kill()
        probe = _in(hosts["X"], "python3", "-c", HELLO_FROM, "10.78.0.2", str(PORT))
        assert probe.stdout.strip() == "refused", probe

        m = _daemon(hosts["M"], {"m": {
            "llama_server": str(llama_server), "model": str(tiny_model), "port": 8080,
            "ctx_size": 256, "threads": 1, "n_gpu_layers": "all", "autostart": True,
            "rpc": [f"10.77.0.2:{PORT}"], "restart": {"delay_s": 0.5}}})
        mm = m
        wait_until(lambda: _state(mm, "m") == "running", "the instance runs in M")
        reply = _in(hosts["M"], "curl", "-sf", "--max-time", "60",
                    "http://127.0.0.1:8080/v1/chat/completions", "-d",
                    json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 4}))
        assert reply.returncode == 0, reply.stderr
        assert json.loads(reply.stdout)["choices"]
        assert "Accepted client connection" in w.ctl("logs", "w").stdout

        # kill -9 of the worker: M's instance is diagnosed with that cause and recovers once W's
        # mi50d has restarted the worker.
        pid = int(_status(w, "w")["pid"])
        os.kill(pid, signal.SIGKILL)
        lost = f"RPC worker 10.77.0.2:{PORT} unreachable"
        wait_until(lambda: lost in mm.log_text(), "M sees the worker gone")
        wait_until(lambda: _state(w, "w") == "running" and int(_status(w, "w")["pid"]) != pid,
                   "W restarted the worker")
        wait_until(lambda: _state(mm, "m") == "running"
                   and int(_status(mm, "m")["restarts"]) >= 1, "M restarted the instance")
        again = _in(hosts["M"], "curl", "-sf", "--max-time", "60",
                    "http://127.0.0.1:8080/v1/chat/completions", "-d",
                    json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 4}))
        assert again.returncode == 0, again.stderr
        assert w.ctl("stop", "w").returncode == 0  # a stopped worker leaves no filter behind
        assert _in(hosts["W"], "nft", "list", "table", "inet", "mi50d_w").returncode != 0
    finally:
        if m is not None:
            m.close()
        w.close()
