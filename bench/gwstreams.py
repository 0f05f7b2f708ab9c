"""8. The gateway's cost on the request path, against the same upstream reached directly.

a) The real llama-server (tiny model, 64 slots): c concurrent streaming chat completions through
   the gateway of a mi50d process, against the same c streams to llama-server's own port; rounds
   alternate which goes first. Per round: the median time to first token (TTFT, to the first
   event with content) of the round's streams, and tokens/s over the round (every content event
   is one token); p50 and p99 of TTFT over every stream of every round go in the notes.
b) A fast fake upstream (bench/fastupstream.py) that streams 120-byte events as fast as it can:
   bytes/s of one stream through the gateway against direct, the proxy's own ceiling; and one
   short request after another (one event each): the gateway's fixed cost per request.
The client is aiohttp in this process; mi50d and the upstreams are other processes.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.configs import LLAMA_SERVER
from bench.procs import daemon, free_port
from bench.stats import Row, paired, percentile
from tests.support import fake_env, write_config

SECTION = "8 gateway"
FAST = Path(__file__).with_name("fastupstream.py")
SLOTS = 64


@dataclass
class Round:
    ttft_ms: list[float]
    tokens_per_s: float
    bytes_per_s: float


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, object],
               began: float) -> tuple[float | None, int, int]:
    try:
        return await _one_try(session, url, body, began)
    except aiohttp.ServerDisconnectedError:
        # A pooled connection the server closed just as it was reused (llama-server also
        # closes one after 100 requests): send once more, as the gateway's proxy does.
        return await _one_try(session, url, body, began)


async def _one_try(session: aiohttp.ClientSession, url: str, body: dict[str, object],
                   began: float) -> tuple[float | None, int, int]:
    first: float | None = None
    tokens = size = 0
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            size += len(line)
            if (line.startswith(b"data: ") and b'"content"' in line) or line.startswith(b"data: x"):
                tokens += 1
                if first is None:
                    first = time.perf_counter() - began
    return first, tokens, size


async def _round(session: aiohttp.ClientSession, url: str, n: int,
                 body: dict[str, object]) -> Round:
    began = time.perf_counter()
    got = await asyncio.gather(*(_one(session, url, body, began) for _ in range(n)))
    wall = time.perf_counter() - began
    return Round([f * 1000 for f, _, _ in got if f is not None],
                 sum(t for _, t, _ in got) / wall, sum(s for _, _, s in got) / wall)


async def _per_request(session: aiohttp.ClientSession, gw: str, fport: int, n: int) -> Row:
    """The gateway's fixed cost: one short request after another (the fake upstream answers a
    non-streaming POST with one event), through the gateway and direct, alternating."""
    via: list[float] = []
    base: list[float] = []
    urls = [(f"{gw}/v1/completions", via), (f"http://127.0.0.1:{fport}/x", base)]
    for i in range(n + 20):
        for url, into in urls if i % 2 else urls[::-1]:
            t0 = time.perf_counter()
            async with session.post(url, json={"model": "fast-one", "prompt": "x"}) as resp:
                await resp.read()
            if i >= 20:  # the first ones warm the pools
                into.append((time.perf_counter() - t0) * 1000)
    row = paired(SECTION, "fast fake upstream: one short request, sent -> answer read", "ms",
                 via, base, "direct", goal="+<= 2 ms", fmt=".2f")
    row.met = row.diff is not None and row.diff.median <= 2.0
    return row


def _config(work: Path, model: Path, gport: int, workers: int) -> tuple[Path, int, int, int]:
    tport, fport, oport = free_port(), free_port(), free_port()
    directory = write_config(work / "gw-streams", {
        "llama_server": str(LLAMA_SERVER), "preflight": False,
        "gateway": {"listen": f"127.0.0.1:{gport}", "workers": workers}}, {
        "tiny": {"model": str(model), "port": tport, "autostart": True, "threads": 1,
                 "ctx_size": 512 * SLOTS, "args": ["--parallel", str(SLOTS)]},
        "fast": {"llama_server": str(FAST), "model": "/dev/null", "port": fport,
                 "autostart": True, "env": fake_env()},
        "fast-one": {"llama_server": str(FAST), "model": "/dev/null", "port": oport,
                     "autostart": True, "env": fake_env(FAST_CHUNKS=1)}})
    return directory, tport, fport, oport


async def _measure(gport: int, tport: int, fport: int, oport: int, counts: list[int],
                   rounds: int, tokens: int, via_what: str) -> list[Row]:
    rows: list[Row] = []
    gw, direct = f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{tport}"
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0)  # llama-server's is 5 s
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for n in counts:
            body = {"model": "tiny", "stream": True, "max_tokens": max(tokens // n, 16),
                    "messages": [{"role": "user", "content": "hi"}]}
            await _round(session, f"{gw}/v1/chat/completions", n, body)  # warm both paths
            await _round(session, f"{direct}/v1/chat/completions", n, body)
            via: list[Round] = []
            base: list[Round] = []
            for r in range(rounds * 3 if n == 1 else rounds):  # one stream: cheap, noisy
                order = [(gw, via), (direct, base)]
                for url, into in order if r % 2 else order[::-1]:
                    into.append(await _round(session, f"{url}/v1/chat/completions", n, body))
            rows.append(paired(SECTION, f"tiny, {n} streams{via_what}: TTFT p50", "ms",
                               [statistics.median(x.ttft_ms) for x in via],
                               [statistics.median(x.ttft_ms) for x in base], "direct",
                               goal="+<= 2 ms", fmt=".2f"))
            rows[-1].met = rows[-1].diff is not None and rows[-1].diff.median <= 2.0
            pooled_via = [t for x in via for t in x.ttft_ms]
            pooled_base = [t for x in base for t in x.ttft_ms]
            rows[-1].notes.append(
                f"TTFT over all {len(pooled_via)} streams: p50 {percentile(pooled_via, 50):.2f} / "
                f"p99 {percentile(pooled_via, 99):.2f} ms through the gateway, p50 "
                f"{percentile(pooled_base, 50):.2f} / p99 {percentile(pooled_base, 99):.2f} ms "
                "direct")
            rows.append(paired(SECTION, f"tiny, {n} streams{via_what}: tokens/s", "tok/s",
                               [x.tokens_per_s for x in via], [x.tokens_per_s for x in base],
                               "direct", goal="ratio >= 0.98", fmt=".0f"))
            rows[-1].met = rows[-1].ratio is not None and rows[-1].ratio.median >= 0.98
        rows.append(await _per_request(session, gw, oport, rounds * 50))
        fast_body = {"model": "fast", "stream": True}
        gw_fast, direct_fast = f"{gw}/v1/chat/completions", f"http://127.0.0.1:{fport}/x"
        await _round(session, gw_fast, 1, fast_body)
        via, base = [], []
        for r in range(rounds):
            order = [(gw_fast, via), (direct_fast, base)]
            for url, into in order if r % 2 else order[::-1]:
                into.append(await _round(session, url, 1, fast_body))
        rows.append(paired(SECTION, "fast fake upstream, 1 stream of 120 B events: throughput",
                           "MB/s", [x.bytes_per_s / 1e6 for x in via],
                           [x.bytes_per_s / 1e6 for x in base], "direct", fmt=".1f"))
    return rows


def run(work: Path, model: Path, counts: list[int], rounds: int, tokens: int,
        workers: int = 0) -> list[Row]:
    """The rows; with `workers`, the gateway runs that many front processes ([gateway]
    workers) and the figures say so."""
    gport = free_port()
    directory, tport, fport, oport = _config(work, model, gport, workers)
    via_what = f", {workers} fronts" if workers else ""
    with daemon(directory, work) as d:
        d.wait_log("new=running", 3, 300)
        return asyncio.run(_measure(gport, tport, fport, oport, counts, rounds, tokens,
                                    via_what))
