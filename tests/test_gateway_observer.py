"""What an observer (metrics) is told, with the real llama-server: each request's start and end
with its status, time to first token and token counts (from the answer's usage or timings),
queue depth while an on-demand start is waited for, requests in flight; and extra routes (as
/metrics will be) served behind the same key check."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mi50d.gateway.observer import NullObserver, Observer
from tests.ctlsupport import server_instance
from tests.gatewaysupport import gateway_on
from tests.support import free_port, write_config

pytestmark = [pytest.mark.llama, pytest.mark.usefixtures("fronts")]


@dataclass
class Recording:
    """An Observer that keeps every call."""

    calls: list[tuple[object, ...]] = field(default_factory=list)

    def request_started(self, model: str) -> None:
        self.calls.append(("started", model))

    def request_finished(self, model: str, code: int, duration_s: float, ttft_s: float | None,
                         prompt_tokens: int | None, generated_tokens: int | None) -> None:
        assert duration_s >= 0 and (ttft_s is None or 0 <= ttft_s <= duration_s)
        self.calls.append(("finished", model, code, ttft_s is not None, prompt_tokens,
                           generated_tokens))

    def queue_changed(self, model: str, depth: int) -> None:
        self.calls.append(("queue", model, depth))

    def in_flight_changed(self, model: str, n: int) -> None:
        self.calls.append(("in_flight", model, n))

    def swap_finished(self, model: str, duration_s: float) -> None:
        self.calls.append(("swap", model))

    def of(self, kind: str) -> list[tuple[object, ...]]:
        return [c for c in self.calls if c[0] == kind]


def test_null_observer_is_an_observer() -> None:
    observers: list[Observer] = [NullObserver(), Recording()]
    for o in observers:
        o.request_started("m")
        o.request_finished("m", 200, 0.1, None, None, None)


@pytest.mark.asyncio
async def test_observer_sees_requests_tokens_queue_and_in_flight(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    gport = free_port()
    cfg = write_config(tmp_path / "cfg", {"preflight": False, "gateway": {
        "listen": f"127.0.0.1:{gport}", "api_key_file": str(keys)}},
        {"od": server_instance(request, free_port(), on_demand=True, alias="tiny")})
    seen = Recording()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=f"requests {len(seen.of('finished'))}\n")

    async with gateway_on(cfg, seen, [web.get("/metrics", metrics)]) as (_, _rec, gw), \
            aiohttp.ClientSession(headers={"Authorization": "Bearer k"}) as s:
        url = f"{gw.url}/v1/chat/completions"
        body = {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}

        async def plain() -> int:
            async with s.post(url, json=body) as resp:
                await resp.read()
                return resp.status

        assert list(await asyncio.gather(plain(), plain(), plain())) == [200, 200, 200]
        async with s.post(url, json={**body, "stream": True}) as resp:
            await resp.read()
        async with s.post(url, json={"model": "nope"}) as resp:
            assert resp.status == 404  # not routed: not observed
        async with s.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 200 and (await resp.text()) == "requests 4\n"
        async with aiohttp.ClientSession() as anonymous, \
                anonymous.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 401  # extra routes sit behind the key check
    assert seen.of("started") == [("started", "tiny")] * 4
    finished = seen.of("finished")
    assert len(finished) == 4 and all(c[1:3] == ("tiny", 200) for c in finished)
    plain_calls, streamed = finished[:3], finished[3]
    assert all(c[3] is False for c in plain_calls) and streamed[3] is True  # TTFT: streams
    for call in finished:  # llama-server's usage/timings: a prompt, and 5 tokens generated
        prompt, generated = call[4], call[5]
        assert isinstance(prompt, int) and prompt > 0 and generated == 5
    depths = [int(str(c[2])) for c in seen.of("queue")]
    assert max(depths) == 3 and depths[-1] == 0  # all three waited for the one start
    flights = [int(str(c[2])) for c in seen.of("in_flight")]
    assert flights[-1] == 0 and max(flights) >= 1
    assert seen.of("swap") == []  # nothing had to make room
