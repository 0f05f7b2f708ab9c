"""Bad input at the gateway: a clear OpenAI-style error for each, and the running instance (the
real llama-server) untouched. Also: a vision-sized body passes under the default limit."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.ctlsupport import fake_instance, server_instance
from tests.gatewaysupport import Codes, gateway_on
from tests.support import fake_env, free_port, write_config

pytestmark = [pytest.mark.llama, pytest.mark.usefixtures("fronts")]


async def call(session: aiohttp.ClientSession, method: str, url: str,
               **kw: object) -> tuple[int, dict[str, object]]:
    async with session.request(method, url, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.json()


def error(doc: dict[str, object]) -> dict[str, str]:
    err = doc["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.asyncio
async def test_bad_input_gets_a_clear_error_and_touches_nothing(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# gateway keys\nfirst-key\n\nsecond-key\n")
    gport = free_port()
    cfg = write_config(tmp_path / "cfg", {"preflight": False, "gateway": {
        "listen": f"127.0.0.1:{gport}", "api_key_file": str(keys), "max_body_bytes": 4096}},
        {"a": server_instance(request, free_port(), autostart=True)})
    async with gateway_on(cfg) as (sup, rec, gw), aiohttp.ClientSession() as s:
        await rec.wait("a", "running")
        pid = sup.get("a").pid
        chat = f"{gw.url}/v1/chat/completions"
        good = {"Authorization": "Bearer second-key"}
        async with s.get(f"{gw.url}/health") as resp:  # the only route without a key
            assert resp.status == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-Api-Key": "nope"},
                        {"Authorization": "Basic Zmlyc3Qta2V5"}):
            status, doc = await call(s, "POST", chat, json={"model": "a"}, headers=headers)
            assert status == 401 and "api_key_file" in error(doc)["message"]
        status, doc = await call(s, "GET", f"{gw.url}/v1/models", headers=good)
        assert status == 200
        status, doc = await call(s, "POST", chat, data=b"{not json", headers=good)
        assert status == 400 and "not JSON" in error(doc)["message"]
        assert "naming one of: a" in error(doc)["message"]
        status, doc = await call(s, "POST", chat, json=["a"], headers=good)
        assert status == 400 and "not an object" in error(doc)["message"]
        status, doc = await call(s, "POST", chat, json={"messages": []}, headers=good)
        assert status == 400 and 'no "model"' in error(doc)["message"]
        status, doc = await call(s, "POST", chat, json={"model": 7}, headers=good)
        assert status == 400
        status, doc = await call(s, "POST", chat, json={"model": "zz"}, headers=good)
        assert status == 404 and error(doc)["code"] == "model_not_found"
        status, doc = await call(s, "POST", f"{gw.url}/v2/chat", json={"model": "a"},
                                 headers=good)
        assert status == 404 and "/v1/chat/completions" in error(doc)["message"]
        status, doc = await call(s, "GET", chat, headers=good)
        assert status == 405 and "use POST" in error(doc)["message"]
        big = b'{"model": "a", "pad": "' + b"x" * 8192 + b'"}'
        status, doc = await call(s, "POST", chat, data=big, headers=good)
        assert status == 413 and "max_body_bytes=4096" in error(doc)["message"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(8):
                yield b" " * 1024

        status, doc = await call(s, "POST", chat, data=chunks(), headers=good)
        assert status == 413
        status, doc = await call(s, "POST", chat, json={"model": "a", "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "hi"}]},
                                 headers={"X-Api-Key": "first-key"})
        assert status == 200 and doc["model"] == "a"
        assert sup.get("a").pid == pid
        assert rec.sequence("a") == ["stopped", "starting", "running"]


@pytest.mark.asyncio
async def test_a_vision_sized_body_passes_the_default_limit(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    gport = free_port()
    cfg = write_config(tmp_path, {"preflight": False, "gateway": {"listen": f"127.0.0.1:{gport}"}},
                       {"a": server_instance(request, free_port(), autostart=True)})
    image = base64.b64encode(os.urandom(15 << 20)).decode()  # a 20 MiB base64 "image"
    async with gateway_on(cfg) as (_, rec, gw), aiohttp.ClientSession() as s:
        await rec.wait("a", "running")
        # /detokenize ignores the extra field; llama-server parses the 20 MiB body and answers.
        body = json.dumps({"model": "a", "tokens": [], "image": image}).encode()
        status, doc = await call(s, "POST", f"{gw.url}/detokenize", data=io.BytesIO(body),
                                 headers={"Content-Type": "application/json"})
        assert status == 200 and doc == {"content": ""}


@pytest.mark.asyncio
async def test_a_cookie_an_answer_sets_goes_to_that_client_only(tmp_path: Path) -> None:
    """The gateway's one upstream session must keep no cookies: a Set-Cookie in one client's
    answer reaches that client and never rides along with another client's request."""
    gport = free_port()
    cfg = write_config(tmp_path, {"preflight": False, "gateway": {"listen": f"127.0.0.1:{gport}"}},
                       {"a": fake_instance(free_port(), autostart=True, host="localhost",
                                           env={"FAKE_SET_COOKIE": "sid=first-client"})})
    async with gateway_on(cfg) as (_, rec, gw):
        await rec.wait("a", "running")
        # An upstream reached by name (a jar ignores cookies of bare IP addresses).
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as first:
            status, doc = await call(first, "POST", f"{gw.url}/v1/completions", json={"model": "a"})
            assert status == 200 and doc["cookie"] == ""
            jar = first.cookie_jar.filter_cookies(URL(f"{gw.url}/v1/completions"))
            assert jar["sid"].value == "first-client"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as second:
            status, doc = await call(second, "POST", f"{gw.url}/v1/completions",
                                     json={"model": "a"})
            assert status == 200 and doc["cookie"] == ""  # nothing of the first client's


@pytest.mark.asyncio
async def test_clients_leaving_a_fast_stream_are_counted_not_logged_as_errors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An upstream that streams as fast as it can (bench/fastupstream.py), clients that read a
    little and leave: the gateway is often mid-write when the client's connection closes. Each is
    counted as 499, nothing is logged as an error, and the gateway keeps answering."""
    fast = Path(__file__).parents[1] / "bench" / "fastupstream.py"
    gport = free_port()
    cfg = write_config(tmp_path, {"preflight": False, "gateway": {"listen": f"127.0.0.1:{gport}"}},
                       {"fast": {"llama_server": str(fast), "model": "/dev/null",
                                 "port": free_port(), "autostart": True,
                                 "env": fake_env(FAST_CHUNKS=2_000_000)}})
    codes = Codes()
    async with gateway_on(cfg, codes) as (_, rec, _gw):
        await rec.wait("fast", "running")
        body = b'{"model": "fast"}'
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                   b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", gport)
            writer.write(request)
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await reader.readexactly(4096)
            writer.write_eof()  # the client leaves mid-stream: its FIN, then its close
            writer.close()
            await writer.wait_closed()
        async with asyncio.timeout(30):
            while len(codes.codes) < 10:
                codes.changed.clear()
                await codes.changed.wait()
        assert codes.codes == [499] * 10
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and r.name.startswith(("aiohttp", "mi50d.gateway"))] == []

