"""mi50d.metrics against real supervisors (the fake server for faults), the recorded sysfs trees of
two MI50s and prometheus_client's own text parser; GET /metrics served by a bare aiohttp app on
loopback (the gateway's listener serves it in the daemon)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mi50d.config import load_config
from mi50d.engine.supervisor import Supervisor
from mi50d.host.ggufmeta import read_gguf
from mi50d.host.vram import estimate
from mi50d.metrics.exporter import Exporter
from mi50d.metrics.gateway import GatewayMetrics
from mi50d.metrics.routes import metrics_routes, upstream_timeout
from mi50d.metrics.upstream import Fetched, Upstream
from tests.ggufwriter import write_model
from tests.support import Recorder, fake_daemon, fake_env, free_port, supervising, write_config

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
GPU0 = "sys/devices/pci0000:00/0000:00:03.1/0000:03:00.0"
GPU1 = "sys/devices/pci0000:80/0000:80:01.1/0000:83:00.0"
# Units a series must not be in (Prometheus wants base units: bytes, seconds, celsius, watts).
NOT_BASE_UNITS = re.compile(r"_(percent|milli\w*|micro\w*|kilo\w*|mega\w*|ms|us|[kmg]i?b|"
                            r"fahrenheit|minutes?|hours?|mhz|mw)(_|$)")


# ---- helpers ---------------------------------------------------------------------------------

def host_tree(tmp: Path) -> Path:
    """A writable copy of the recorded two-MI50 host (16 GB + 32 GB)."""
    root = tmp / "host"
    shutil.copytree(HOSTS / "two-mi50", root, symlinks=True)
    return root


def on_host(root: Path, **extra: Any) -> dict[str, Any]:
    paths = {"sysfs_root": str(root / "sys"), "dev_root": str(root / "dev"),
             "rocm_path": str(root / "opt" / "rocm")}
    return fake_daemon(host=paths, **extra)


def fake(port: int, **extra: Any) -> dict[str, Any]:
    table: dict[str, Any] = {"model": "/dev/null", "port": port, "autostart": True,
                             "env": fake_env()}
    table.update(extra)
    return table


@contextlib.asynccontextmanager
async def exporting(directory: Path, timeout_s: float = 2.0
                    ) -> AsyncIterator[tuple[Supervisor, Recorder, Exporter]]:
    async with supervising(directory) as (sup, rec), Exporter(sup, timeout_s) as exp:
        yield sup, rec, exp


async def scrape(exp: Exporter) -> tuple[str, dict[str, Metric]]:
    text = (await exp.render()).decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def values(fams: Mapping[str, Metric], sample: str, **labels: str) -> list[float]:
    """Values of the samples named `sample` whose labels include `labels`."""
    out = []
    for fam in fams.values():
        for s in fam.samples:
            if s.name == sample and labels.items() <= s.labels.items():
                out.append(s.value)
    return out


def value(fams: Mapping[str, Metric], sample: str, **labels: str) -> float:
    found = values(fams, sample, **labels)
    assert len(found) == 1, f"{sample}{labels}: {found}"
    return found[0]


def read_int(path: Path) -> int:
    return int(path.read_text())


@contextlib.contextmanager
def observed(sup: Supervisor, event: str) -> Iterator[asyncio.Event]:
    """An event set whenever the engine observes `event` (after the exporter has seen it)."""
    seen = asyncio.Event()
    inner = sup.observe

    def observe(name: str, kind: str, seconds: float) -> None:
        inner(name, kind, seconds)
        if kind == event:
            seen.set()

    sup.observe = observe
    try:
        yield seen
    finally:
        sup.observe = inner


# ---- the scrape: families, names, values -------------------------------------------------------

@pytest.mark.asyncio
async def test_scrape_follows_conventions_and_matches_sysfs_and_states(tmp_path: Path) -> None:
    root = host_tree(tmp_path)
    hw0 = root / GPU0 / "hwmon" / "hwmon2"
    for n, label, hz in ((1, "sclk", 1725000000), (2, "mclk", 1000000000)):
        (hw0 / f"freq{n}_input").write_text(f"{hz}\n")
        (hw0 / f"freq{n}_label").write_text(f"{label}\n")
    (root / GPU0 / "unique_id").write_text("5c49a1e4a3e8bd3a\n")
    cfg = write_config(tmp_path / "etc", on_host(root), {
        "up": fake(free_port()),
        "broken": fake(free_port(), llama_server=str(tmp_path / "no-such-binary")),
        "idle": fake(free_port(), autostart=False),
    })
    async with exporting(cfg) as (sup, rec, exp):
        await rec.wait("up", "running")
        await rec.wait("broken", "failed")
        text, fams = await scrape(exp)
        states = {st.name: st.state for st in sup.status()}

    # Every family has HELP and TYPE, and follows the naming conventions.
    for fam in fams.values():
        exposed = f"{fam.name}_total" if fam.type == "counter" else fam.name
        assert fam.documentation, f"{fam.name} has no HELP text"
        assert f"# HELP {exposed} " in text and f"# TYPE {exposed} " in text, fam.name
        if not fam.name.startswith("mi50d_"):
            assert fam.name.startswith("process_"), f"unexpected family {fam.name}"
            continue
        assert re.fullmatch(r"mi50d_[a-z0-9_]+", fam.name), fam.name
        assert not NOT_BASE_UNITS.search(fam.name), f"{fam.name}: not in base units"
        assert not [s for s in fam.samples if s.name.endswith("_created")], fam.name
        if fam.type == "counter":
            assert all(s.name == f"{fam.name}_total" for s in fam.samples), fam.name
        else:
            assert not fam.name.endswith("_total"), f"{fam.name}: _total on a {fam.type}"

    # GPUs: labelled by PCI address, values read straight from the sysfs files, in base units.
    for dev, hwmon, gpu in ((GPU0, "hwmon2", "0000:03:00.0"), (GPU1, "hwmon3", "0000:83:00.0")):
        base, hw = root / dev, root / dev / "hwmon" / hwmon
        assert value(fams, "mi50d_gpu_vram_used_bytes", gpu=gpu) == read_int(base / "mem_info_vram_used")
        assert value(fams, "mi50d_gpu_vram_total_bytes", gpu=gpu) == read_int(base / "mem_info_vram_total")
        assert value(fams, "mi50d_gpu_busy_ratio", gpu=gpu) == read_int(base / "gpu_busy_percent") / 100
        assert value(fams, "mi50d_gpu_power_watts", gpu=gpu) == read_int(hw / "power1_average") / 1e6
        for n, sensor in ((1, "edge"), (2, "junction"), (3, "memory")):
            assert (hw / f"temp{n}_label").read_text().strip() == sensor.removesuffix("ory")
            assert value(fams, "mi50d_gpu_temperature_celsius", gpu=gpu, sensor=sensor) == (
                read_int(hw / f"temp{n}_input") / 1000)
    assert 0 <= min(values(fams, "mi50d_gpu_busy_ratio")) <= max(values(fams, "mi50d_gpu_busy_ratio")) <= 1
    assert value(fams, "mi50d_gpu_clock_hertz", gpu="0000:03:00.0", clock="sclk") == 1725000000
    assert value(fams, "mi50d_gpu_clock_hertz", gpu="0000:03:00.0", clock="mclk") == 1000000000
    assert values(fams, "mi50d_gpu_clock_hertz", gpu="0000:83:00.0") == []  # no freq files there
    assert value(fams, "mi50d_gpu_info", gpu="0000:03:00.0", index="0", card="card0",
                 unique_id="5c49a1e4a3e8bd3a") == 1
    assert value(fams, "mi50d_gpu_info", gpu="0000:83:00.0", index="1", card="card1") == 1

    # Instances: exactly one state is 1, the one the supervisor reports.
    assert states == {"up": "running", "broken": "failed", "idle": "stopped"}
    for name, state in states.items():
        ones = [s.labels["state"] for s in fams["mi50d_instance_state"].samples
                if s.labels["instance"] == name and s.value == 1]
        assert ones == [state], name
        assert len(values(fams, "mi50d_instance_state", instance=name)) == 7
        assert value(fams, "mi50d_instance_up", instance=name) == (1 if state == "running" else 0)
        assert value(fams, "mi50d_instance_restarts_total", instance=name) == 0
    # The fake server answers /metrics with JSON: left out, and counted.
    assert value(fams, "mi50d_upstream_scrape_errors_total", instance="up", reason="parse") == 1
    assert not [s for f in fams.values() if not f.name.startswith(("mi50d_", "process_"))
                for s in f.samples]


@pytest.mark.asyncio
async def test_instance_vram_from_the_kfd_and_the_estimate(tmp_path: Path) -> None:
    root = host_tree(tmp_path)
    model = write_model(tmp_path / "m.gguf", n_layer=4)
    cfg = write_config(tmp_path / "etc", on_host(root),
                       {"a": fake(free_port(), model=str(model), gpus=[1], ctx_size=512)})
    async with exporting(cfg) as (sup, rec, exp):
        await rec.wait("a", "running")
        pid = sup.status("a")[0].pid
        gpu_id = (root / "sys/class/kfd/kfd/topology/nodes/2/gpu_id").read_text().strip()
        proc = root / "sys/class/kfd/kfd/proc" / str(pid)
        proc.mkdir()
        (proc / f"vram_{gpu_id}").write_text("1234567890\n")
        _, fams = await scrape(exp)
        conf = sup.get("a").config
    assert values(fams, "mi50d_instance_vram_bytes", instance="a") == [1234567890]
    assert value(fams, "mi50d_instance_vram_bytes", instance="a", gpu="0000:83:00.0") == 1234567890
    expected = estimate(conf, read_gguf(model), 0, n_gpus=1).total
    assert expected > 0
    assert value(fams, "mi50d_instance_vram_estimate_bytes", instance="a") == expected


@pytest.mark.asyncio
async def test_start_and_probe_histograms_and_a_restart(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "etc", on_host(host_tree(tmp_path)), {
        "a": fake(free_port(), env=fake_env(FAKE_LOAD_S=0.3), restart={"delay_s": 0},
                  health={"interval_s": 0.05})})
    async with exporting(cfg) as (sup, rec, exp):
        with observed(sup, "health_probe") as probed:
            await rec.wait("a", "running")
            probed.clear()
            await probed.wait()
        _, fams = await scrape(exp)
        assert value(fams, "mi50d_instance_start_duration_seconds_count", instance="a") == 1
        # FAKE_LOAD_S: it answers 503 for 0.3 s after it starts listening.
        assert value(fams, "mi50d_instance_start_duration_seconds_sum", instance="a") >= 0.3
        assert value(fams, "mi50d_instance_health_probe_duration_seconds_count", instance="a") >= 1
        pid = sup.status("a")[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await rec.wait("a", "running", count=2)
        _, fams = await scrape(exp)
    assert value(fams, "mi50d_instance_restarts_total", instance="a") == 1
    assert value(fams, "mi50d_instance_start_duration_seconds_count", instance="a") == 2
    assert value(fams, "mi50d_instance_up", instance="a") == 1


@pytest.mark.asyncio
async def test_a_removed_instance_leaves_no_series(tmp_path: Path) -> None:
    etc, root = tmp_path / "etc", host_tree(tmp_path)
    probed_often = {"interval_s": 0.05}
    cfg = write_config(etc, on_host(root), {"a": fake(free_port(), health=probed_often),
                                            "b": fake(free_port())})
    async with exporting(cfg) as (sup, rec, exp):
        with observed(sup, "health_probe") as probed:
            await rec.wait("a", "running")
            await rec.wait("b", "running")
            probed.clear()
            await probed.wait()
        _, fams = await scrape(exp)  # the fake's JSON answers are counted as parse errors
        assert values(fams, "mi50d_instance_health_probe_duration_seconds_count", instance="a")
        assert values(fams, "mi50d_upstream_scrape_errors_total", instance="a")
        (etc / "a.toml").unlink()
        await sup.apply(load_config(etc), sup.account)
        _, fams = await scrape(exp)
    assert [s for f in fams.values() for s in f.samples if s.labels.get("instance") == "a"] == []
    assert value(fams, "mi50d_instance_up", instance="b") == 1


# ---- upstream /metrics ---------------------------------------------------------------------

@pytest.mark.asyncio
async def test_an_upstream_that_does_not_answer_is_left_out_within_the_timeout(
    tmp_path: Path
) -> None:
    # A stopped process: the kernel still accepts connections, nothing answers. Health probes
    # are far apart so mi50d does not kill it during the scrape.
    slow = {"interval_s": 60, "timeout_s": 30}
    cfg = write_config(tmp_path / "etc", on_host(host_tree(tmp_path)),
                       {"h": fake(free_port(), health=slow), "ok": fake(free_port())})
    async with exporting(cfg, timeout_s=0.5) as (sup, rec, exp):
        await rec.wait("h", "running")
        await rec.wait("ok", "running")
        pid = sup.status("h")[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(0.5 + 10):  # the upstream timeout, and slack for a busy host
                _, fams = await scrape(exp)
        finally:
            os.kill(pid, signal.SIGCONT)
    assert value(fams, "mi50d_upstream_scrape_errors_total", instance="h", reason="timeout") == 1
    assert values(fams, "mi50d_upstream_scrape_errors_total", reason="timeout") == [1]
    assert value(fams, "mi50d_instance_state", instance="h", state="running") == 1


@pytest.mark.asyncio
async def test_the_scrapers_timeout_bounds_the_upstream_fetches(tmp_path: Path) -> None:
    slow = {"interval_s": 60, "timeout_s": 30}
    cfg = write_config(tmp_path / "etc", on_host(host_tree(tmp_path)),
                       {"h": fake(free_port(), health=slow)})
    # The exporter would wait 60 s; Prometheus says it waits 0.5 s for the whole scrape.
    async with exporting(cfg, timeout_s=60) as (sup, rec, exp), serving(exp) as url, \
            aiohttp.ClientSession() as client:
        await rec.wait("h", "running")
        pid = sup.status("h")[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(15), client.get(
                    url, headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.5"}) as resp:
                assert resp.status == 200
                fams = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        finally:
            os.kill(pid, signal.SIGCONT)
    assert value(fams, "mi50d_upstream_scrape_errors_total", instance="h", reason="timeout") == 1


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("10", 8.0), ("0.5", 0.4), ("0", None), ("-1", None), ("soon", None),
    ("nan", None), ("inf", None)])
def test_upstream_share_of_the_scrape_timeout(header: str | None, expected: float | None) -> None:
    assert upstream_timeout(header) == expected


def test_relabel_keeps_names_and_labels_every_sample_with_its_instance() -> None:
    up = Upstream(CollectorRegistry())
    a = ("# HELP llamacpp:requests_processing Requests processing.\n"
         "# TYPE llamacpp:requests_processing gauge\n"
         "llamacpp:requests_processing 2\n"
         "# TYPE llamacpp:tokens_predicted_total counter\n"
         "llamacpp:tokens_predicted_total{instance=\"x\"} 17\n"
         "# TYPE mi50d_instance_up gauge\nmi50d_instance_up 5\n"
         "# TYPE process_open_fds gauge\nprocess_open_fds 7\n")
    b = ("# TYPE llamacpp:requests_processing_total counter\nllamacpp:requests_processing_total 9\n"
         "# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 4\n")
    out = up.relabel([Fetched("a", a), Fetched("b", b), Fetched("c", '{"status":"ok"}')])
    fams = {f.name: f for f in out}
    assert set(fams) == {"llamacpp:requests_processing", "llamacpp:tokens_predicted"}
    # b's family of the same name but another type is dropped, not merged.
    assert [(s.labels, s.value) for s in fams["llamacpp:requests_processing"].samples] == [
        ({"instance": "a"}, 2)]
    assert fams["llamacpp:requests_processing"].documentation == "Requests processing."
    assert fams["llamacpp:tokens_predicted"].documentation  # HELP filled in when upstream has none
    assert [(s.labels, s.value) for s in fams["llamacpp:tokens_predicted"].samples] == [
        ({"exported_instance": "x", "instance": "a"}, 17), ({"instance": "b"}, 4)]
    errors = {tuple(s.labels.values()): s.value for f in up.errors.collect() for s in f.samples
              if s.name.endswith("_total")}
    assert errors == {("c", "parse"): 1}

    class Out:
        def collect(self) -> list[Metric]:
            return out

    again = {f.name: f for f in text_string_to_metric_families(generate_latest(Out()).decode())}
    assert set(again) == set(fams)


@pytest.mark.asyncio
async def test_an_unreadable_api_key_file_is_counted(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "etc", on_host(host_tree(tmp_path)), {
        "k": fake(free_port(), api_key_file=str(tmp_path / "missing.key"))})
    async with exporting(cfg) as (_sup, rec, exp):
        await rec.wait("k", "running")
        _, fams = await scrape(exp)
    assert value(fams, "mi50d_upstream_scrape_errors_total", instance="k", reason="api_key") == 1


@pytest.mark.asyncio
async def test_an_answer_past_the_size_limit_is_left_out(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "etc", on_host(host_tree(tmp_path)), {"big": fake(free_port())})
    async with exporting(cfg) as (_sup, rec, exp):
        exp.upstream.max_body = 8  # the fake server's answer is 15 bytes
        await rec.wait("big", "running")
        _, fams = await scrape(exp)
    assert value(fams, "mi50d_upstream_scrape_errors_total", instance="big", reason="too_large") == 1


@pytest.mark.asyncio
async def test_metrics_false_is_not_scraped_and_not_passed(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "etc", on_host(host_tree(tmp_path)),
                       {"q": fake(free_port(), metrics=False)})
    async with exporting(cfg) as (sup, rec, exp):
        await rec.wait("q", "running")
        _, fams = await scrape(exp)
        assert "--metrics" not in sup.get("q").config.argv(sup.config.daemon)
    assert values(fams, "mi50d_upstream_scrape_errors_total", instance="q") == []


# ---- the gateway's observer ------------------------------------------------------------------

class BriefObserver(Protocol):
    """The gateway's `mi50d.gateway.observer.Observer` as agreed before it landed; mypy checks
    that GatewayMetrics meets it (and the test below checks the real one, once it exists)."""

    def request_started(self, model: str) -> None: ...

    def request_finished(self, model: str, code: int, duration_s: float, ttft_s: float | None,
                         prompt_tokens: int | None, generated_tokens: int | None) -> None: ...

    def queue_changed(self, model: str, depth: int) -> None: ...

    def in_flight_changed(self, model: str, n: int) -> None: ...

    def swap_finished(self, model: str, duration_s: float) -> None: ...


def test_gateway_metrics_meet_the_gateways_observer() -> None:
    observer: BriefObserver = GatewayMetrics(CollectorRegistry())
    assert observer is not None
    if importlib.util.find_spec("mi50d.gateway") is None:
        return
    real = importlib.import_module("mi50d.gateway.observer").Observer
    for name, member in inspect.getmembers(real, inspect.isfunction):
        if not name.startswith("_"):
            mine = getattr(GatewayMetrics, name)
            assert list(inspect.signature(mine).parameters) == list(
                inspect.signature(member).parameters), name


def test_gateway_series() -> None:
    registry = CollectorRegistry()
    gw = GatewayMetrics(registry)
    gw.request_started("qwen")
    gw.in_flight_changed("qwen", 1)
    gw.queue_changed("qwen", 3)
    gw.request_finished("qwen", 200, 2.5, 0.4, 120, 30)
    gw.request_finished("qwen", 200, 1.0, None, None, None)
    gw.request_finished("qwen", 503, 0.01, None, None, None)
    gw.swap_finished("qwen", 42.0)
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert value(fams, "mi50d_gateway_requests_total", model="qwen", code="200") == 2
    assert value(fams, "mi50d_gateway_requests_total", model="qwen", code="503") == 1
    assert value(fams, "mi50d_gateway_request_duration_seconds_count", model="qwen") == 3
    assert value(fams, "mi50d_gateway_request_duration_seconds_sum", model="qwen") == 3.51
    assert value(fams, "mi50d_gateway_time_to_first_token_seconds_count", model="qwen") == 1
    assert value(fams, "mi50d_gateway_prompt_tokens_total", model="qwen") == 120
    assert value(fams, "mi50d_gateway_generated_tokens_total", model="qwen") == 30
    assert value(fams, "mi50d_gateway_in_flight", model="qwen") == 1
    assert value(fams, "mi50d_gateway_queue_depth", model="qwen") == 3
    assert value(fams, "mi50d_gateway_swaps_total", model="qwen") == 1
    assert value(fams, "mi50d_gateway_swap_duration_seconds_sum", model="qwen") == 42
    gw.request_started("other")  # a model's series exist from its first request
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert value(fams, "mi50d_gateway_generated_tokens_total", model="other") == 0


# ---- serving ---------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def serving(exp: Exporter) -> AsyncIterator[str]:
    """GET /metrics in a bare aiohttp app on loopback; yields its URL."""
    app = web.Application()
    app.add_routes(metrics_routes(exp))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_get_metrics_with_no_instance_has_gpu_series(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "etc", on_host(host_tree(tmp_path)), {})
    async with exporting(cfg) as (_sup, _rec, exp), serving(exp) as url, \
            aiohttp.ClientSession() as client, client.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        fams = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    assert len(values(fams, "mi50d_gpu_vram_total_bytes")) == 2
    assert fams["mi50d_instance_state"].samples == []
