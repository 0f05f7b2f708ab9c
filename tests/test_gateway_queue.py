"""Waiting for an on-demand start, with the fake server's slow load (fault injection: the wait
must be long enough to fill the queue): past max_queue a 429, a client that gives up leaves the
queue without disturbing the start, and a start slower than start_timeout_s is a 503."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from mi50d.config import load_config
from mi50d.host.accounts import account_for
from tests.ctlsupport import fake_instance
from tests.gatewaysupport import Timeline, gateway_on
from tests.support import fake_daemon, free_port, supervising, write_config

pytestmark = pytest.mark.usefixtures("fronts")


async def post(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.post(url, json={"model": "slow"}) as resp:
        return resp.status, await resp.text()


@pytest.mark.asyncio
async def test_queue_full_is_429_and_a_leaving_client_leaves_the_queue(tmp_path: Path) -> None:
    gport = free_port()
    cfg = write_config(tmp_path, fake_daemon(gateway={"listen": f"127.0.0.1:{gport}",
                                                      "max_queue": 3}),
                       {"slow": fake_instance(free_port(), on_demand=True,
                                              env={"FAKE_LOAD_S": 3})})
    async with gateway_on(cfg) as (sup, rec, gw), aiohttp.ClientSession() as s:
        url = f"{gw.url}/v1/completions"
        act = gw.ondemand.activity("slow")
        leaving = asyncio.create_task(post(s, url))
        waiting = [asyncio.create_task(post(s, url)) for _ in range(2)]
        async with asyncio.timeout(30):
            while act.waiting < 3:  # noqa: ASYNC110 (the gateway's counter; no event to await)
                await asyncio.sleep(0.01)
        status, text = await post(s, url)  # a fourth while three wait
        assert status == 429 and "3 requests for slow are already waiting" in text
        leaving.cancel()  # its client gives up
        with pytest.raises(asyncio.CancelledError):
            await leaving
        async with asyncio.timeout(30):
            while act.waiting != 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert sup.get("slow").state == "starting"  # the start goes on for the others
        assert [t[0] for t in await asyncio.gather(*waiting)] == [200, 200]
        assert act.waiting == 0 and act.in_flight == 0
        assert rec.sequence("slow") == ["stopped", "starting", "running"]


@pytest.mark.asyncio
async def test_start_slower_than_start_timeout_is_503(tmp_path: Path) -> None:
    gport = free_port()
    cfg = write_config(tmp_path, fake_daemon(gateway={"listen": f"127.0.0.1:{gport}"}),
                       {"slow": fake_instance(free_port(), on_demand=True,
                                              env={"FAKE_LOAD_S": 30},
                                              health={"start_timeout_s": 0.5},
                                              restart={"policy": "never"})})
    async with gateway_on(cfg) as (_, _rec, gw), aiohttp.ClientSession() as s:
        status, text = await post(s, f"{gw.url}/v1/completions")
        assert status == 503 and "did not become ready within start_timeout_s=0.5" in text


@pytest.mark.asyncio
async def test_starts_on_different_gpus_run_in_parallel_and_on_one_gpu_in_turn(
        tmp_path: Path) -> None:
    sysfs = Path(__file__).parent / "fixtures" / "hosts" / "two-mi50" / "sys"
    gport = free_port()
    slow = {"on_demand": True, "env": {"FAKE_LOAD_S": 1}}
    cfg = write_config(tmp_path, fake_daemon(gateway={"listen": f"127.0.0.1:{gport}"},
                                             host={"sysfs_root": str(sysfs)}), {
        "a": fake_instance(free_port(), gpus=[0], **slow),
        "b": fake_instance(free_port(), gpus=[1], **slow),
        "c": fake_instance(free_port(), gpus=[0], **slow)})
    async with gateway_on(cfg) as (sup, _, gw), aiohttp.ClientSession() as s:
        line = Timeline(sup)
        try:
            url = f"{gw.url}/v1/completions"

            async def ask(model: str) -> int:
                async with s.post(url, json={"model": model}) as resp:
                    return resp.status

            assert list(await asyncio.gather(ask("a"), ask("b"), ask("c"))) == [200] * 3
            await line.wait("c:running")
            events = [e for e in line.events if e.endswith((":starting", ":running"))]
        finally:
            line.close()
    first, second = sorted("ac", key=lambda n: events.index(f"{n}:starting"))
    # GPU 0's two instances start one after the other; GPU 1's beside the first of them.
    assert events.index(f"{second}:starting") > events.index(f"{first}:running")
    assert events.index("b:starting") < events.index(f"{first}:running")


@pytest.mark.asyncio
async def test_a_reload_changing_only_gateway_keys_restarts_nothing(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, fake_daemon(), {
        "a": fake_instance(port, autostart=True)})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("a", "running")
        pid = sup.get("a").pid
        write_config(tmp_path, fake_daemon(), {
            "a": fake_instance(port, autostart=True, on_demand=True, idle_unload_s=30)})
        new = load_config(cfg)
        report = await sup.apply(new, account_for(new))
        assert report.unchanged == ["a"] and report.restarted == []
        assert sup.get("a").pid == pid
        assert sup.get("a").config.on_demand and sup.get("a").config.idle_unload_s == 30
