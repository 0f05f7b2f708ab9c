"""The guide's swap on the recorded two-MI50 host: two on-demand models that do not fit together
on GPU 1. The real llama-server runs on the CPU; the test plays the kernel's part in the copied
sysfs tree (what a process holds appears under kfd/proc/<pid> and in mem_info_vram_used once it
runs, and goes away a little after it exits), so the gateway's plan, drain, stop, release wait
and start are the real ones."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mi50d.config import load_config
from mi50d.engine.supervisor import Supervisor
from mi50d.host.ggufmeta import read_gguf
from mi50d.host.vram import estimate
from tests.ctlsupport import server_instance
from tests.gatewaysupport import Timeline, gateway_on
from tests.support import free_port, write_config

pytestmark = [pytest.mark.llama, pytest.mark.usefixtures("fronts")]

FIXTURE = Path(__file__).parent / "fixtures" / "hosts" / "two-mi50" / "sys"
GPU1_ID = 5210  # gpu_id of the topology's second GPU node
GPU1_DEVICE = "devices/pci0000:80/0000:80:01.1/0000:83:00.0"
RELEASE_LAG_S = 0.3  # the kernel frees a process's VRAM a moment after it is reaped


class Kernel:
    """The KFD and amdgpu's part: an alive instance holds `each` bytes on GPU 1."""

    def __init__(self, sysfs: Path, supervisor: Supervisor, line: Timeline, each: int,
                 lag_s: float = RELEASE_LAG_S) -> None:
        self.sysfs, self.sup, self.line, self.each = sysfs, supervisor, line, each
        self.lag_s = lag_s
        self.used = sysfs / GPU1_DEVICE / "mem_info_vram_used"
        self.pids: dict[str, int] = {}

    def _set_used(self) -> None:
        self.used.write_text(f"{self.each * len(self.pids)}\n")

    async def run(self) -> None:
        with self.sup.events.subscribe(size=10_000) as sub:
            while True:
                event = await sub.get()
                if event["event"] != "state":
                    continue
                st = event["status"]
                name, state, pid = st["name"], st["state"], st["pid"]
                if state == "running" and name not in self.pids:
                    proc = self.sysfs / "class/kfd/kfd/proc" / str(pid)
                    proc.mkdir()
                    (proc / f"vram_{GPU1_ID}").write_text(f"{self.each}\n")
                    self.pids[name] = pid
                    self._set_used()
                    self.line.note(f"kfd:holds {name}")
                elif state == "stopped" and name in self.pids:
                    await asyncio.sleep(self.lag_s)
                    shutil.rmtree(self.sysfs / "class/kfd/kfd/proc" / str(self.pids.pop(name)))
                    self._set_used()
                    self.line.note(f"kfd:released {name}")


@contextlib.asynccontextmanager
async def kernel_for(sysfs: Path, sup: Supervisor, each: int,
                     lag_s: float = RELEASE_LAG_S) -> AsyncIterator[Timeline]:
    line = Timeline(sup)
    kernel = Kernel(sysfs, sup, line, each, lag_s)
    task = asyncio.create_task(kernel.run())
    try:
        yield line
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        line.close()


def setup_host(tmp_path: Path, request: pytest.FixtureRequest,
               instances: dict[str, dict[str, Any]]) -> tuple[Path, Path, int]:
    """Copy the two-MI50 tree; size GPU 1 so one tiny instance fits and two do not."""
    sysfs = tmp_path / "sys"
    shutil.copytree(FIXTURE, sysfs, symlinks=True)
    gport = free_port()
    table = {name: server_instance(request, free_port(), gpus=[1], **extra)
             for name, extra in instances.items()}
    cfg = write_config(tmp_path / "cfg", {
        "preflight": False, "host": {"sysfs_root": str(sysfs)},
        "gateway": {"listen": f"127.0.0.1:{gport}", "swap_wait_s": 60}}, table)
    conf = next(iter(load_config(cfg).instances.values()))
    assert conf.model is not None
    need = estimate(conf, read_gguf(conf.model), n_gpus=1).total
    (sysfs / GPU1_DEVICE / "mem_info_vram_total").write_text(f"{need * 3 // 2}\n")
    (sysfs / GPU1_DEVICE / "mem_info_vram_used").write_text("0\n")
    return cfg, sysfs, need


def order(events: list[str], wanted: list[str]) -> list[str]:
    return [e for e in events if e in wanted]


@pytest.mark.asyncio
async def test_b_waits_for_a_stream_then_a_stops_releases_and_b_loads(
        tmp_path: Path, request: pytest.FixtureRequest, fronts: int) -> None:
    endless = {"args": ["--context-shift", "--parallel", "1"], "ctx_size": 512}
    cfg, sysfs, need = setup_host(tmp_path, request, {
        "a": {"on_demand": True, **endless}, "b": {"on_demand": True}})
    async with gateway_on(cfg) as (sup, _, gw), kernel_for(sysfs, sup, need) as line, \
            aiohttp.ClientSession() as session:
        url = f"{gw.url}/v1/chat/completions"
        stream_a = await session.post(url, json={
            "model": "a", "stream": True, "max_tokens": 2000,
            "messages": [{"role": "user", "content": "hi"}]})
        assert stream_a.status == 200
        await stream_a.content.readany()
        line.note("a:streaming")
        await line.wait("kfd:holds a")
        line.note("b:requested")
        answer_b = asyncio.create_task(session.post(url, json={
            "model": "b", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))
        text_a = (await stream_a.read()).decode()
        line.note("a:stream-ended")
        resp_b = await answer_b
        doc_b = await resp_b.json()
        assert resp_b.status == 200 and doc_b["model"] == "b" and doc_b["choices"]
        assert text_a.rstrip().endswith("data: [DONE]")  # A's client got its whole answer
        wanted = ["a:stopped", "b:stopped", "a:starting", "a:running", "kfd:holds a",
                  "a:streaming", "b:requested", "a:stream-ended", "a:stopping", "a:stopped",
                  "kfd:released a", "b:starting", "b:running", "kfd:holds b"]
        if fronts:
            # A front tells the daemon that A's stream ended once it wrote the end, while this
            # client may still be reading it: A's stop and this note race (other processes).
            # That the stream was whole when A stopped is the [DONE] above: SIGTERM mid-stream
            # would have cut it.
            wanted.remove("a:stream-ended")
        await line.wait("kfd:holds b")
        assert order(line.events, wanted) == wanted, " ".join(line.events)
        assert gw.in_flight("a") == gw.in_flight("b") == 0


@pytest.mark.asyncio
async def test_no_room_even_after_evicting_names_the_holder(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cfg, sysfs, need = setup_host(tmp_path, request, {
        "pinned": {"autostart": True}, "b": {"on_demand": True}})
    async with gateway_on(cfg) as (sup, rec, gw), kernel_for(sysfs, sup, need) as line, \
            aiohttp.ClientSession() as session:
        await line.wait("kfd:holds pinned")
        async with session.post(f"{gw.url}/v1/completions",
                                json={"model": "b", "prompt": "x", "max_tokens": 1}) as resp:
            doc = await resp.json()
        assert resp.status == 503 and doc["error"]["code"] == "insufficient_vram"
        message = doc["error"]["message"]
        assert "b does not fit: needs ~" in message and "on GPU 1" in message
        assert "pinned holds" in message and "not on demand" in message
        assert rec.sequence("b") == ["stopped"]  # never started
        assert rec.sequence("pinned") == ["stopped", "starting", "running"]  # never stopped
