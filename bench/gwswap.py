"""9. Swap: from the request for B (A up and idle, only one fits) to B's first token through the
gateway, against doing it by hand: stop A, wait until its VRAM is released, start B, wait until
it is running, send the same request to B directly. Both on the recorded two-MI50 host with the
tests' stand-in kernel (tests/test_gateway_swap.py) releasing VRAM as soon as a process is
reaped; in one process (Supervisor, gateway, kernel and client share the loop). Each swap leaves
the other model up, so the two ways alternate direction."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import aiohttp

from bench.configs import LLAMA_SERVER
from bench.procs import free_port
from bench.stats import Row, paired
from mi50d.config import load_config
from mi50d.host.ggufmeta import read_gguf
from mi50d.host.vram import estimate
from tests.gatewaysupport import Timeline, gateway_on
from tests.support import write_config
from tests.test_gateway_swap import FIXTURE, GPU1_DEVICE, kernel_for

SECTION = "9 swap"
BODY = {"stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


async def _first_token(session: aiohttp.ClientSession, url: str, model: str) -> None:
    async with session.post(url, json={**BODY, "model": model}) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if b'"content"' in line:
                return


def _setup(work: Path, model: Path) -> Path:
    sysfs = work / "swap-sys"
    shutil.copytree(FIXTURE, sysfs, symlinks=True)
    inst = {"model": str(model), "ctx_size": 256, "threads": 1, "gpus": [1], "on_demand": True}
    directory = write_config(work / "swap", {
        "llama_server": str(LLAMA_SERVER), "preflight": False,
        "host": {"sysfs_root": str(sysfs)},
        "gateway": {"listen": f"127.0.0.1:{free_port()}"}},
        {"a": {**inst, "port": free_port()}, "b": {**inst, "port": free_port()}})
    conf = load_config(directory).instances["a"]
    assert conf.model is not None
    need = estimate(conf, read_gguf(conf.model), n_gpus=1).total
    (sysfs / GPU1_DEVICE / "mem_info_vram_total").write_text(f"{need * 3 // 2}\n")
    (sysfs / GPU1_DEVICE / "mem_info_vram_used").write_text("0\n")
    return directory


async def _measure(directory: Path, reps: int) -> list[Row]:
    sysfs = Path(str(load_config(directory).daemon.host.sysfs_root))
    conf = load_config(directory).instances["a"]
    assert conf.model is not None
    need = estimate(conf, read_gguf(conf.model), n_gpus=1).total
    via: list[float] = []
    hand: list[float] = []
    notes: list[str] = []
    async with gateway_on(directory) as (sup, _, gw), \
            kernel_for(sysfs, sup, need, lag_s=0.0) as line, aiohttp.ClientSession() as s:
        url = f"{gw.url}/v1/chat/completions"
        await _first_token(s, url, "a")  # a up; warms the page cache
        up, down = "a", "b"
        # Pairs alternate which way goes first, so each way swaps in both directions; the
        # first pair only warms up (code and pages loaded for the first time).
        for rep in range(reps + 1):
            for way in ("gateway", "hand") if rep % 2 == 0 else ("hand", "gateway"):
                t0 = time.perf_counter()
                if way == "gateway":
                    await _first_token(s, url, down)
                else:
                    released = line.count(f"kfd:released {up}")
                    await sup.stop(up)
                    if sup.get(up).last_exit != "exit 0":
                        notes.append(f"by hand, stopping {up}: {sup.get(up).last_exit}")
                    await line.wait(f"kfd:released {up}", released + 1)
                    running = line.count(f"{down}:running")
                    sup.start(down)
                    await line.wait(f"{down}:running", running + 1)
                    endpoint = sup.get(down).config.endpoint()
                    await _first_token(s, f"{endpoint}/v1/chat/completions", down)
                took = (time.perf_counter() - t0) * 1000
                print(f"  swap {way} {up}->{down}: {took:.0f} ms", flush=True)
                if rep:
                    (via if way == "gateway" else hand).append(took)
                up, down = down, up
    row = paired(SECTION, "tiny on one GPU: request for B -> B's first token (A up, idle)",
                 "ms", via, hand,
                 "by hand: stop A, wait for release, start B, request", goal="+<= 50 ms")
    row.met = row.diff is not None and row.diff.median <= 50
    row.notes += notes
    return [row]


def run(work: Path, model: Path, reps: int) -> list[Row]:
    return asyncio.run(_measure(_setup(work, model), reps))


__all__ = ["Timeline", "run"]
