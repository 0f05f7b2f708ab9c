"""Metrics (issue #12), scrape latency: `GET /metrics` with 1, 16 and 64 fake instances up on the
recorded two-MI50 sysfs tree (each with a KFD entry, so every scrape reads what a real host
has), against a GET of a static body of the same size from the same aiohttp app, alternating.
Upstream scrapes are excluded here (`metrics = false`); a last row adds real llama-server
upstreams when the CPU build exists.

    .venv/bin/python -m bench.metrics_scrape [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from bench.configs import LLAMA_SERVER
from bench.inproc import supervised
from bench.procs import free_port
from bench.stats import Row, paired, percentile, text_table
from mi50d.engine.supervisor import Supervisor
from mi50d.llama import source, tinymodel
from mi50d.metrics.exporter import Exporter
from mi50d.metrics.routes import metrics_routes
from tests.support import fake_daemon, fake_env, write_config

SECTION = "M1 scrape"
HOSTS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hosts"
GOAL_P99_MS = 10.0  # at GOAL_COUNT instances, upstream excluded (the median block's p99)
GOAL_COUNT = 16


def host_tree(work: Path) -> Path:
    root = work / "host"
    if not root.exists():
        shutil.copytree(HOSTS / "two-mi50", root, symlinks=True)
    return root


def host_paths(root: Path) -> dict[str, str]:
    return {"sysfs_root": str(root / "sys"), "dev_root": str(root / "dev"),
            "rocm_path": str(root / "opt" / "rocm")}


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (the kernel may hand out a just-closed one twice)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def fake_config(work: Path, count: int, root: Path) -> Path:
    health = {"interval_s": 5.0, "timeout_s": 3.0}
    ports = free_ports(count)
    insts = {f"f{i:03d}": {"model": "/dev/null", "port": ports[i], "autostart": True,
                           "env": fake_env(), "health": health, "metrics": False,
                           "gpus": [i % 2]}
             for i in range(count)}
    return write_config(work / f"scrape-{count}", fake_daemon(host=host_paths(root)), insts)


def hold_vram(root: Path, sup: Supervisor) -> None:
    """A KFD entry per instance process, as amdgpu lists it for a process holding VRAM."""
    ids = [(root / f"sys/class/kfd/kfd/topology/nodes/{n}/gpu_id").read_text().strip()
           for n in (1, 2)]
    for i, st in enumerate(sup.status()):
        proc = root / "sys/class/kfd/kfd/proc" / str(st.pid)
        proc.mkdir(exist_ok=True)
        (proc / f"vram_{ids[i % 2]}").write_text(f"{(i + 1) << 28}\n")


@contextlib.asynccontextmanager
async def serving(exp: Exporter, static: bytes) -> AsyncIterator[str]:
    async def fixed(request: web.Request) -> web.Response:
        return web.Response(body=static, headers={"Content-Type": "text/plain"})

    app = web.Application()
    app.add_routes([*metrics_routes(exp), web.get("/static", fixed)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """Wall time and this process's CPU time (client and server, every thread) of one GET, ms."""
    begun, cpu = time.perf_counter(), time.process_time()
    async with client.get(url) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return (time.perf_counter() - begun) * 1000, (time.process_time() - cpu) * 1000


async def measure(sup: Supervisor, blocks: int, per_block: int, label: str,
                  goal: bool) -> list[Row]:
    """Scrapes alternating with static GETs; `goal`: the p99 goal applies (upstream excluded)."""
    async with Exporter(sup) as exp:
        body = await exp.render()
        render_ms = []
        for _ in range(50):
            begun = time.perf_counter()
            await exp.render()
            render_ms.append((time.perf_counter() - begun) * 1000)
        async with serving(exp, body) as base, aiohttp.ClientSession() as client:
            for _ in range(20):  # warm the connection pool and caches
                await _get(client, f"{base}/metrics")
                await _get(client, f"{base}/static")
            p50, p99, b50, b99, cpu, bcpu = [], [], [], [], [], []
            for _ in range(blocks):
                ours, theirs = [], []
                for _ in range(per_block):
                    ours.append(await _get(client, f"{base}/metrics"))
                    theirs.append(await _get(client, f"{base}/static"))
                p50.append(percentile([w for w, _ in ours], 50))
                p99.append(percentile([w for w, _ in ours], 99))
                b50.append(percentile([w for w, _ in theirs], 50))
                b99.append(percentile([w for w, _ in theirs], 99))
                cpu.append(sum(c for _, c in ours) / per_block)
                bcpu.append(sum(c for _, c in theirs) / per_block)
    samples = body.count(b"\n") - body.count(b"\n#")
    base_label = f"static {len(body) // 1024} KiB body, same app"
    rows = [
        paired(SECTION, f"GET /metrics, {label}: p50", "ms", p50, b50, base_label, fmt=".2f"),
        paired(SECTION, f"GET /metrics, {label}: p99", "ms", p99, b99, base_label, fmt=".2f",
               goal=f"<= {GOAL_P99_MS:g} ms" if goal else "",
               met=statistics.median(p99) <= GOAL_P99_MS if goal else None),
        paired(SECTION, f"GET /metrics, {label}: CPU per scrape (mean)", "ms", cpu, bcpu,
               base_label, fmt=".2f"),
    ]
    rows[1].notes.append(f"{blocks} blocks of {per_block} scrapes, spread over blocks; "
                         f"{samples} samples, {len(body)} bytes; Exporter.render() alone "
                         f"{percentile(render_ms, 50):.2f} ms p50, {percentile(render_ms, 99):.2f}"
                         " ms p99 (50 calls)")
    return rows


async def fake_rows(work: Path, count: int, blocks: int, per_block: int) -> list[Row]:
    root = host_tree(work)
    cfg = fake_config(work, count, root)
    async with supervised(cfg) as (sup, clock):
        await clock.wait(sup.names(), "running", {}, 180)
        hold_vram(root, sup)
        return await measure(sup, blocks, per_block, f"{count} fake up, upstream excluded",
                             goal=count == GOAL_COUNT)


async def llama_rows(work: Path, model: Path, count: int, blocks: int,
                     per_block: int) -> list[Row]:
    root = host_tree(work)
    insts: dict[str, Any] = {
        f"l{i}": {"model": str(model), "port": free_port(), "autostart": True, "ctx_size": 256,
                  "threads": 1, "n_gpu_layers": 0}
        for i in range(count)}
    daemon = {"llama_server": str(LLAMA_SERVER), "preflight": False, "host": host_paths(root)}
    cfg = write_config(work / f"scrape-llama-{count}", daemon, insts)
    async with supervised(cfg) as (sup, clock):
        await clock.wait(sup.names(), "running", {}, 300)
        return await measure(sup, blocks, per_block,
                             f"{count} llama-server up, their /metrics included", goal=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    blocks, per_block = (3, 50) if args.quick else (5, 200)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="m5bench-") as tmp:
        work = Path(tmp)
        for count in (1, 16, 64):
            rows += uvloop.run(fake_rows(work, count, blocks, per_block))
        if LLAMA_SERVER.is_file():
            src = source.ensure_source()
            model = tinymodel.cached(source.cache_root() / "models", src / tinymodel.VOCAB_FILE)
            rows += uvloop.run(llama_rows(work, model, 4, blocks, per_block))
    print(text_table(rows))
    for row in rows:
        for note in row.notes:
            print(f"- {row.figure}: {note}")


if __name__ == "__main__":
    main()
