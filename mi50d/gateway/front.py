"""A gateway front process: `python -m mi50d.gateway.front` (`[gateway] workers`).

One event loop serves every request of the gateway in turn, so many streams that begin together
wait for one another's setup (about 0.4 ms each). With `workers = N` the daemon starts N of these
processes, each accepting on its own SO_REUSEPORT socket of the gateway's address (the kernel
spreads connections over them), and keeps its own loop for everything else.

A front serves a request itself only where that cannot change what the daemon decides: a POST
whose `model` names an instance the daemon has marked open (up, and not being stopped by a swap
or an idle unload). It counts its requests in flight per instance and tells the daemon when they
change, and reports each finished request for the metrics. Everything else (a stopped or
on-demand instance to start, a swap, /v1/models, /upstream/..., /metrics, every error) goes on,
unchanged, to the daemon's own gateway over a Unix socket, which answers it as it would without
fronts. Before the daemon stops an instance it closes it in every front and waits for their
acknowledgements, which carry their counts: no front starts a request on an instance being
stopped, and none that it started is missed.

The front exits when its channel to the daemon ends (the daemon stopped or died).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import time
from typing import Any

import aiohttp
from aiohttp import web

from mi50d.gateway import channel, routing
from mi50d.gateway.app import CUT_CODES, key_refusal, model_of, read_body
from mi50d.gateway.errors import GatewayError, error_response, internal_error
from mi50d.gateway.proxy import Exchange, client_session, forward, upstream_headers

log = logging.getLogger("mi50d.gateway.front")
MODEL_ROUTES = frozenset(routing.MODEL_ROUTES)
DAEMON = "http://mi50d-gateway"  # the host part is not used on a Unix socket


class Front:
    def __init__(self, writer: asyncio.StreamWriter, internal: str, max_body: int) -> None:
        self._writer = writer
        self._internal = internal
        self.session = client_session()
        self.daemon = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=internal), timeout=self.session.timeout,
            auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent"),
            cookie_jar=aiohttp.DummyCookieJar())
        self.routes: dict[str, str] = {}
        self.open: dict[str, dict[str, Any]] = {}
        self.keys: frozenset[str] | None = None
        self.max_body = max_body
        self.ready = asyncio.Event()
        self.counts: dict[str, int] = {}
        self._done: list[list[Any]] = []
        self._counts_changed = False
        self._flush_due = False

    # ---- the channel -------------------------------------------------------------------------

    def apply(self, message: channel.Message) -> None:
        """A state message: take it and acknowledge it with the counts as they are now."""
        self.routes = message["routes"]
        self.open = message["open"]
        self.keys = None if message["keys"] is None else frozenset(message["keys"])
        self.ready.set()
        self._flush()  # what finished before it, first
        self._writer.write(channel.encode({"t": "ack", "seq": message["seq"],
                                           "counts": self.counts}))

    def _count(self, name: str, step: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + step
        self._counts_changed = True
        self._schedule()

    def _schedule(self) -> None:
        if not self._flush_due:  # one message per loop turn, however many requests changed
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self._counts_changed:
            self._writer.write(channel.encode({"t": "counts", "counts": self.counts}))
            self._counts_changed = False
        if self._done:
            self._writer.write(channel.encode({"t": "done", "requests": self._done}))
            self._done = []

    # ---- requests ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except GatewayError as exc:
            return error_response(exc)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("front_request_crashed method=%s path=%s", request.method,
                          request.path)
            return error_response(internal_error())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await self.ready.wait()
        refused = key_refusal(self.keys, request)
        if refused is not None:
            raise refused
        body = await read_body(request, self.max_body)
        if request.method == "POST" and request.path in MODEL_ROUTES:
            try:
                name = self.routes.get(model_of(body, {}))
            except GatewayError:
                name = None  # the daemon answers it, with the list of models there are
            target = self.open.get(name) if name is not None else None
            if name is not None and target is not None:
                return await self._serve(request, name, target, body)
        return await self._pass(request, body)

    async def _serve(self, request: web.Request, name: str, target: dict[str, Any],
                     body: bytes) -> web.StreamResponse:
        model, url = target["model"], target["url"]
        exchange = Exchange()
        code = 500
        self._count(name, 1)
        try:
            headers = upstream_headers(request.headers, self.keys is not None, target["key"])
            query = f"?{request.query_string}" if request.query_string else ""
            response = await forward(self.session, request, url + request.path + query, body,
                                     headers, exchange, f"{model} ({url})")
            code = CUT_CODES.get(exchange.cut or "", exchange.status)
            return response
        except GatewayError as exc:
            code = exc.status
            raise
        except (asyncio.CancelledError, ConnectionError):
            code = 499
            raise
        finally:
            self._count(name, -1)
            prompt, generated = exchange.tail.counts()
            self._done.append([model, code, time.monotonic() - exchange.began,
                               exchange.first_chunk_s if exchange.streamed else None,
                               prompt, generated])
            self._schedule()

    async def _pass(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """To the daemon's own gateway, credentials and all (it checks them again)."""
        headers = upstream_headers(request.headers, False, None)
        return await forward(self.daemon, request, DAEMON + request.path_qs, body, headers,
                             Exchange(), "mi50d's gateway")

    async def close(self) -> None:
        await self.session.close()
        await self.daemon.close()


async def serve(listen_fd: int, channel_fd: int, internal: str, max_body: int) -> None:
    reader, writer = await asyncio.open_unix_connection(
        sock=socket.socket(fileno=channel_fd), limit=channel.LINE_LIMIT)
    front = Front(writer, internal, max_body)
    app = web.Application(client_max_size=max_body)
    app.add_routes([web.route("*", "/{tail:.*}", front.handle)])
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.SockSite(runner, socket.socket(fileno=listen_fd)).start()
        while (message := await channel.receive(reader)) is not None:
            if message.get("t") == "state":
                front.apply(message)
    finally:
        await runner.cleanup()
        await front.close()
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--internal", required=True, help="the daemon gateway's Unix socket")
    parser.add_argument("--max-body", type=int, required=True, help="[gateway] max_body_bytes")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="gateway-front: %(levelname)s %(name)s %(message)s")
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.listen_fd, args.channel_fd, args.internal, args.max_body))


if __name__ == "__main__":
    main()
