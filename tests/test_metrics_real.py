"""GET /metrics with the real llama-server (CPU build, tiny model) and a real Prometheus (Debian's
`prometheus`, started here on loopback with its own config and storage): a start, a kill -9 and
the restart seen through Prometheus's HTTP API, llama-server's own series under the instance's
label, every query of the shipped Grafana dashboard answered, and a scrape that still answers
while an instance is stopped with SIGSTOP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mi50d.metrics.gateway import GatewayMetrics
from tests.support import free_port, write_config
from tests.test_metrics import GPU0, exporting, host_tree, on_host, serving

pytestmark = pytest.mark.llama

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "mi50d-grafana.json"
UPSTREAM_TIMEOUT_S = 0.5
WAIT_S = 90.0


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("no prometheus binary (scripts/setup.sh installs Debian's `prometheus`)")
    return found


@contextlib.asynccontextmanager
async def prometheus(target: str, tmp: Path) -> AsyncIterator[str]:
    """A real Prometheus scraping `target` (host:port) every second; yields its base URL."""
    port = free_port()
    config = tmp / "prometheus.yml"
    # honor_labels: mi50d's series carry their own `instance` label (the mi50d instance).
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: mi50d\n    honor_labels: true\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    with (tmp / "prometheus.log").open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as client:
                await until(lambda: _ready(client, url), "prometheus ready", proc=proc)
            yield url
        finally:
            if proc.returncode is None:
                proc.terminate()
            async with asyncio.timeout(30):
                await proc.wait()


async def _ready(client: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with client.get(f"{url}/-/ready") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def until(check: Callable[[], Any], what: str, timeout: float = WAIT_S,
                proc: asyncio.subprocess.Process | None = None) -> Any:
    """Re-check `check` (async, returns a truthy result when done) until it holds. Prometheus
    has no way to tell us it scraped, so this asks again every half second."""
    async with asyncio.timeout(timeout):
        while True:
            result = await check()
            if result:
                return result
            if proc is not None and proc.returncode is not None:
                raise AssertionError(f"prometheus exited ({proc.returncode}) before: {what}")
            await asyncio.sleep(0.5)


async def query(client: aiohttp.ClientSession, url: str, expr: str) -> list[dict[str, Any]]:
    async with client.get(f"{url}/api/v1/query", params={"query": expr}) as resp:
        doc = await resp.json()
    assert doc["status"] == "success", (expr, doc)
    return list(doc["data"]["result"])


def numbers(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result]


async def complete(endpoint: str, observer: GatewayMetrics, model: str) -> None:
    """One streamed chat completion, straight to llama-server, reported to the gateway's
    observer the way the gateway will: duration, first byte, and the tokens the stream reports.
    (The gateway lands separately; this stands in for it, with real requests.)"""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
    observer.request_started(model)
    observer.in_flight_changed(model, 1)
    begun = time.monotonic()
    ttft: float | None = None
    prompt = generated = None
    async with aiohttp.ClientSession() as client, \
            client.post(f"{endpoint}/v1/chat/completions", json=body) as resp:
        async for line in resp.content:
            ttft = ttft if ttft is not None else time.monotonic() - begun
            text = line.decode().strip()
            if not text.startswith("data: {"):
                continue
            chunk = json.loads(text.removeprefix("data: "))
            timings = chunk.get("timings") or {}
            usage = chunk.get("usage") or {}
            prompt = usage.get("prompt_tokens", timings.get("prompt_n", prompt))
            generated = usage.get("completion_tokens", timings.get("predicted_n", generated))
        code = resp.status
    observer.in_flight_changed(model, 0)
    observer.request_finished(model, code, time.monotonic() - begun, ttft, prompt, generated)


def llama_instance(llama_server: Path, model: Path, **extra: Any) -> dict[str, Any]:
    return {"model": str(model), "port": free_port(), "ctx_size": 256, "threads": 1,
            "autostart": True, "llama_server": str(llama_server), **extra}


def hold_vram(root: Path, pid: int | None, size: int) -> None:
    """What the KFD would list for `pid` on an MI50 (this host runs llama-server on the CPU)."""
    assert pid is not None
    gpu_id = (root / "sys/class/kfd/kfd/topology/nodes/1/gpu_id").read_text().strip()
    proc = root / "sys/class/kfd/kfd/proc" / str(pid)
    proc.mkdir(exist_ok=True)
    (proc / f"vram_{gpu_id}").write_text(f"{size}\n")


@pytest.mark.asyncio
async def test_prometheus_sees_a_crash_and_restart_and_answers_the_dashboard(
    tmp_path: Path, llama_server: Path, tiny_model: Path
) -> None:
    root = host_tree(tmp_path)
    hw0 = root / GPU0 / "hwmon" / "hwmon2"
    (hw0 / "freq1_input").write_text("1725000000\n")
    (hw0 / "freq1_label").write_text("sclk\n")
    # Backoff of 3 s so that at least one scrape (every 1 s) sees the instance down.
    cfg = write_config(tmp_path / "etc", on_host(root), {"tiny": llama_instance(
        llama_server, tiny_model, restart={"delay_s": 3}, health={"interval_s": 0.5})})
    async with exporting(cfg, UPSTREAM_TIMEOUT_S) as (sup, rec, exp), serving(exp) as url, \
            prometheus(url.removeprefix("http://").removesuffix("/metrics"), tmp_path) as prom, \
            aiohttp.ClientSession() as client:
        await rec.wait("tiny", "running")
        endpoint = sup.get("tiny").config.endpoint()
        hold_vram(root, sup.status("tiny")[0].pid, 1 << 30)
        await complete(endpoint, exp.gateway, "tiny")
        async with client.get(f"{endpoint}/metrics") as resp:
            own = {f.name for f in text_string_to_metric_families(await resp.text())}
        assert own, "llama-server --metrics reports something"

        async def running_seen() -> bool:
            return numbers(await query(client, prom,
                                       'mi50d_instance_state{instance="tiny",state="running"}')) == [1]

        await until(running_seen, "the running state in prometheus")

        async def upstream_seen() -> set[str]:
            found = await query(client, prom, '{instance="tiny",__name__!~"(mi50d|process)_.*"}')
            return {r["metric"]["__name__"] for r in found}

        names = await until(upstream_seen, "llama-server's series with instance=tiny")
        # Each re-exported name is one of llama-server's (a counter keeps its _total).
        assert {n.removesuffix("_total") for n in names} <= own | {n.removesuffix("_total")
                                                                   for n in own}

        pid = sup.status("tiny")[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        exp.gateway.queue_changed("tiny", 1)
        down = time.monotonic()
        await rec.wait("tiny", "running", count=2)
        exp.gateway.swap_finished("tiny", time.monotonic() - down)
        exp.gateway.queue_changed("tiny", 0)
        hold_vram(root, sup.status("tiny")[0].pid, 1 << 30)
        for _ in range(2):
            await complete(endpoint, exp.gateway, "tiny")

        async def restart_seen() -> bool:
            restarts = await query(client, prom, 'mi50d_instance_restarts_total{instance="tiny"}')
            up = await query(client, prom, 'mi50d_instance_up{instance="tiny"}')
            return numbers(restarts) == [1] and numbers(up) == [1]

        await until(restart_seen, "the restart counted and the instance up again")
        window = 'mi50d_instance_state{instance="tiny",state="%s"}[5m]'
        assert numbers(await query(client, prom, f"max_over_time({window % 'backoff'})")) == [1]
        assert numbers(await query(client, prom, f"min_over_time({window % 'running'})")) == [0]
        assert numbers(await query(client, prom,
                                   'min_over_time(mi50d_instance_up{instance="tiny"}[5m])')) == [0]
        starts = await query(client, prom,
                             'mi50d_instance_start_duration_seconds_count{instance="tiny"}')
        assert numbers(starts) == [2]

        # Every query of the shipped dashboard answers with data (a number, not NaN).
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"].replace("$__rate_interval", "1m") for p in dashboard["panels"]
                 for t in p.get("targets", [])]
        assert len(exprs) >= 15
        for expr in exprs:
            async def answered(expr: str = expr) -> bool:
                return any(not math.isnan(v) for v in numbers(await query(client, prom, expr)))

            await until(answered, f"dashboard query {expr}", timeout=30)


@pytest.mark.asyncio
async def test_scrape_answers_while_an_instance_is_stopped(
    tmp_path: Path, llama_server: Path, tiny_model: Path
) -> None:
    slow = {"interval_s": 60, "timeout_s": 30}  # so mi50d does not kill the stopped process
    cfg = write_config(tmp_path / "etc", on_host(host_tree(tmp_path)), {
        "a": llama_instance(llama_server, tiny_model, health=slow),
        "b": llama_instance(llama_server, tiny_model)})
    async with exporting(cfg, UPSTREAM_TIMEOUT_S) as (sup, rec, exp), serving(exp) as url, \
            aiohttp.ClientSession() as client:
        await rec.wait("a", "running")
        await rec.wait("b", "running")

        async def scrape() -> dict[str, set[str]]:
            async with client.get(url) as resp:
                text = await resp.text()
            by_instance: dict[str, set[str]] = {}
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if not fam.name.startswith(("mi50d_", "process_")):
                        by_instance.setdefault(s.labels["instance"], set()).add(fam.name)
            return by_instance

        before = await scrape()
        assert before.get("a") and before["a"] == before.get("b")
        pid = sup.status("a")[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(UPSTREAM_TIMEOUT_S + 10):  # slack for a busy host
                during = await scrape()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert "a" not in during and during.get("b") == before["b"]
        errors = exp.registry.get_sample_value("mi50d_upstream_scrape_errors_total",
                                               {"instance": "a", "reason": "timeout"})
        assert errors == 1


@pytest.mark.asyncio
async def test_an_instance_behind_an_api_key_is_scraped_with_its_key(
    tmp_path: Path, llama_server: Path, tiny_model: Path
) -> None:
    key = tmp_path / "keys"
    key.write_text("\nsecret-for-metrics\nanother\n")
    cfg = write_config(tmp_path / "etc", on_host(host_tree(tmp_path)),
                       {"k": llama_instance(llama_server, tiny_model, api_key_file=str(key))})
    async with exporting(cfg, UPSTREAM_TIMEOUT_S) as (sup, rec, exp), \
            aiohttp.ClientSession() as client:
        await rec.wait("k", "running")
        endpoint = sup.get("k").config.endpoint()
        async with client.get(f"{endpoint}/metrics") as resp:
            assert resp.status == 401  # llama-server wants the key for /metrics
        text = (await exp.render()).decode()
    fams = list(text_string_to_metric_families(text))
    upstream = [s for f in fams if not f.name.startswith(("mi50d_", "process_"))
                for s in f.samples]
    assert upstream and all(s.labels["instance"] == "k" for s in upstream)
    assert "mi50d_upstream_scrape_errors_total{" not in text
