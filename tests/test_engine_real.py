"""The supervision engine against the real llama-server (CPU build) on the generated tiny model:
start -> running and a completion, stop, crash -> restart, hang -> restart, reload diff, and no
llama-server left behind when the daemon is killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import free_port, supervising, write_config

pytestmark = pytest.mark.llama


def _daemon(llama_server: Path) -> dict[str, object]:
    return {"llama_server": str(llama_server), "preflight": False}


def _inst(model: Path, port: int, **extra: object) -> dict[str, object]:
    return {"model": str(model), "port": port, "ctx_size": 256, "threads": 1, "autostart": True,
            **extra}


def _complete(port: int) -> str:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        doc = json.load(resp)
    return str(doc["choices"][0]["message"]["content"])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone for our purposes only once reaped; check its state.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.asyncio
async def test_start_complete_stop(tmp_path: Path, llama_server: Path, tiny_model: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, _daemon(llama_server), {"tiny": _inst(tiny_model, port)})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("tiny", "running")
        (st,) = sup.status("tiny")
        assert st.pid is not None and st.endpoint == f"http://127.0.0.1:{port}"
        text = await asyncio.to_thread(_complete, port)
        assert isinstance(text, str)
        pid = st.pid
        await sup.stop("tiny")
        assert rec.sequence("tiny") == ["stopped", "starting", "running", "stopping", "stopped"]
        assert _gone(pid)
        assert sup.get("tiny").lines, "llama-server's output was captured"


@pytest.mark.asyncio
async def test_kill_9_is_restarted(tmp_path: Path, llama_server: Path, tiny_model: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, _daemon(llama_server),
                       {"tiny": _inst(tiny_model, port, restart={"delay_s": 0})})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("tiny", "running")
        first = sup.status("tiny")[0].pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        seq = await rec.wait("tiny", "running", count=2)
        assert seq == ["stopped", "starting", "running", "backoff", "starting", "running"]
        st = sup.status("tiny")[0]
        assert st.pid != first and st.restarts == 1 and st.last_exit == "signal 9 (SIGKILL)"
        assert "crashed (signal 9 (SIGKILL))" in rec.reasons["tiny"][3]
        await asyncio.to_thread(_complete, port)


@pytest.mark.asyncio
async def test_sigstop_hang_is_detected_and_restarted(
    tmp_path: Path, llama_server: Path, tiny_model: Path
) -> None:
    health = {"interval_s": 0.5, "timeout_s": 0.5, "failures": 2}
    cfg = write_config(tmp_path, _daemon(llama_server), {
        "tiny": _inst(tiny_model, free_port(), health=health, restart={"delay_s": 0})})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("tiny", "running")
        pid = sup.status("tiny")[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        # Bound from the issue: interval_s * failures + timeout_s, plus slack for the restart.
        bound = health["interval_s"] * health["failures"] + health["timeout_s"]
        seq = await rec.wait("tiny", "backoff", timeout=bound + 10)
        assert seq == ["stopped", "starting", "running", "unhealthy", "backoff"]
        assert "hang: 2 health probes failed in a row" in rec.reasons["tiny"][-1]
        await rec.wait("tiny", "running", count=2)
        assert _gone(pid)


@pytest.mark.asyncio
async def test_reload_restarts_only_the_changed_instance(
    tmp_path: Path, llama_server: Path, tiny_model: Path
) -> None:
    pa, pb = free_port(), free_port()
    cfg = write_config(tmp_path, _daemon(llama_server),
                       {"a": _inst(tiny_model, pa), "b": _inst(tiny_model, pb)})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("a", "running")
        await rec.wait("b", "running")
        pid_a, pid_b = sup.status("a")[0].pid, sup.status("b")[0].pid
        write_config(tmp_path, _daemon(llama_server), {"b": _inst(tiny_model, pb, ctx_size=512)})
        (tmp_path / "c.toml").write_text(f'model = "{tiny_model}"\nport = {free_port()}\n')
        from mi50d.config import load_config
        from mi50d.host.accounts import account_for

        new = load_config(tmp_path)
        report = await sup.apply(new, account_for(new))
        assert (report.added, report.removed, report.restarted, report.unchanged) == (
            ["c"], [], ["b"], ["a"])
        await rec.wait("b", "running", count=2)
        assert sup.status("a")[0].pid == pid_a
        assert sup.status("b")[0].pid not in (None, pid_b)
        assert rec.sequence("a") == ["stopped", "starting", "running"]
        assert sup.status("c")[0].state == "stopped"  # added, not autostart
        assert "--ctx-size 512" in " ".join(sup.get("b").config.argv(sup.config.daemon))


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def test_kill_9_of_the_daemon_leaves_no_llama_server(
    tmp_path: Path, llama_server: Path, tiny_model: Path
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "conf", _daemon(llama_server), {"tiny": _inst(tiny_model, port)})
    mi50d = Path(sys.executable).with_name("mi50d")
    daemon = subprocess.Popen([str(mi50d), "--config-dir", str(cfg),
                               "--socket", str(tmp_path / "s")], stderr=subprocess.PIPE)
    try:
        assert daemon.stderr is not None
        deadline = time.monotonic() + 120
        for raw in daemon.stderr:  # the daemon's log is the contract: wait for the state change
            if b"new=running" in raw or time.monotonic() > deadline:
                break
        children = _children(daemon.pid)
        assert len(children) == 1
        (child,) = children
        assert "llama-server" in Path(f"/proc/{child}/cmdline").read_text()
        daemon.kill()
        daemon.wait()
        # The parent-death signal is delivered by the kernel as the daemon exits.
        for _ in range(200):
            if _gone(child):
                break
            time.sleep(0.05)
        assert _gone(child)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        assert daemon.stderr is not None
        daemon.stderr.close()


@pytest.mark.asyncio
async def test_preflight_refuses_a_taken_port_without_spawning(
    tmp_path: Path, llama_server: Path, tiny_model: Path
) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        free = free_port()
        daemon = {"llama_server": str(llama_server), "preflight": True}
        cfg = write_config(tmp_path, daemon, {
            "taken": _inst(tiny_model, port, n_gpu_layers=0),
            "fine": _inst(tiny_model, free, n_gpu_layers=0)})
        async with supervising(cfg) as (sup, rec):
            seq = await rec.wait("taken", "failed")
            assert seq == ["stopped", "starting", "failed"]
            (st,) = sup.status("taken")
            assert "preflight failed: port" in st.reason
            assert str(port) in st.reason
            assert st.last_exit is None  # nothing was spawned
            # The same preflight lets an honest instance through.
            await rec.wait("fine", "running")


@pytest.mark.asyncio
async def test_cpu_fallback_is_marked_degraded(
    tmp_path: Path, llama_server: Path, tiny_model: Path
) -> None:
    """This CPU build ignores GPU offload; an instance that asked for GPUs runs, but degraded."""
    cfg = write_config(tmp_path, _daemon(llama_server), {
        "wants-gpu": _inst(tiny_model, free_port(), n_gpu_layers="all"),
        "cpu": _inst(tiny_model, free_port(), n_gpu_layers=0)})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("wants-gpu", "running")
        await rec.wait("cpu", "running")
        diagnosis = sup.status("wants-gpu")[0].diagnosis
        assert diagnosis is not None and diagnosis.startswith("degraded: ")
        assert sup.status("cpu")[0].diagnosis is None
