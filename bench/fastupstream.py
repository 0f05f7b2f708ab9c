#!/usr/bin/env python3
"""A stand-in upstream that streams as fast as it can, for the gateway's own ceiling: it takes
llama-server's `--host/--port`, answers GET /health with 200, and answers any POST with
`FAST_CHUNKS` SSE events of `FAST_BYTES` bytes each (default 20000 x 120), each written and
drained before the next, like llama-server's per-token writes."""

from __future__ import annotations

import os
import sys

from aiohttp import web

CHUNKS = int(os.environ.get("FAST_CHUNKS", "20000"))
EVENT = b"data: " + b"x" * (int(os.environ.get("FAST_BYTES", "120")) - 8) + b"\n\n"


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def stream(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(CHUNKS):
        await resp.write(EVENT)
    await resp.write_eof()
    return resp


def main() -> None:
    argv = sys.argv
    host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
    port = int(argv[argv.index("--port") + 1])
    app = web.Application()
    app.add_routes([web.get("/health", health), web.post("/{tail:.*}", stream)])
    web.run_app(app, host=host, port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
