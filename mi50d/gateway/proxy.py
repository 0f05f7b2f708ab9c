"""Streaming pass-through to one instance over the daemon's one long-lived client session.

Timeouts, each set on purpose:
  connect     CONNECT_S to open a connection to llama-server (it listens on loopback: a slow
              connect means it is gone, not busy).
  first byte  FIRST_BYTE_S until the response headers. llama-server sends the headers of a
              non-streaming answer only when the whole answer is ready, so this is an hour.
  between chunks and in total: none. A stream ends when llama-server ends it; a llama-server
              that hangs mid-stream is caught by mi50d's health probes and killed, which ends
              the stream. (aiohttp's default total timeout of 300 s would cut a long generation.)

Each chunk is written as it arrives and the write is awaited (backpressure: a slow client slows
the read from upstream, nothing piles up here); `X-Accel-Buffering: no` asks a reverse proxy in
front not to buffer either. A client that leaves cancels the handler; the cancellation closes the
upstream connection (never returned to the pool), which is how llama-server learns to stop.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from mi50d.gateway.errors import GatewayError
from mi50d.gateway.observer import TokenTail

log = logging.getLogger("mi50d.gateway.proxy")

CONNECT_S = 10.0
FIRST_BYTE_S = 3600.0
# llama-server closes a keep-alive connection idle for 5 s (`Keep-Alive: timeout=5`); the pool
# drops idle connections sooner, so it never hands out one the server is closing.
KEEPALIVE_S = 4.0
# Headers about one hop (RFC 9110 7.6.1) and those aiohttp computes itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host",
                        "content-length"})
CREDENTIALS = frozenset({"authorization", "x-api-key"})
# A body up to this size goes out in the same write as the request's headers (one send instead
# of two: on a VM's loopback a send costs tens of microseconds); a bigger one (a vision request)
# as a file object, in pieces between other work.
INLINE_BODY_BYTES = 256 * 1024


def client_session() -> aiohttp.ClientSession:
    """The one session (connection pool) to every upstream; the caller closes it."""
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_S, sock_connect=CONNECT_S,
                                    sock_read=None)
    # limit=0: no cap of our own on connections; llama-server's slots and our queue bound them.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
    # No cookie jar: the session serves every client, so a cookie one answer set must go back to
    # that client only, never out with another client's request (and no jar is cheaper too).
    return aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                                 skip_auto_headers=("Accept-Encoding", "User-Agent"),
                                 cookie_jar=aiohttp.DummyCookieJar())


CLIENT_LEFT, UPSTREAM_BROKE = "client_left", "upstream_broke"


class Exchange:
    """What one proxied request measured: status, time to first chunk, the answer's tail, and
    how a cut answer was cut (CLIENT_LEFT, UPSTREAM_BROKE)."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.status = 0
        self.cut: str | None = None
        self.first_chunk_s: float | None = None
        self.streamed = False
        self.tail = TokenTail()


def upstream_headers(headers: Mapping[str, str], drop_credentials: bool,
                     upstream_key: str | None) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        if lower in HOP_BY_HOP or (drop_credentials and lower in CREDENTIALS):
            continue
        out.add(key, value)
    if upstream_key is not None:
        out.pop("Authorization", None)
        out.pop("X-Api-Key", None)
        out["Authorization"] = f"Bearer {upstream_key}"
    return out


async def _send(session: aiohttp.ClientSession, method: str, url: str, body: bytes,
                headers: CIMultiDict[str]) -> aiohttp.ClientResponse:
    """The request, sent again once on a fresh connection when the connection closes before
    any answer. That is a pooled connection the server closed as idle just as it was reused
    (the server never read the request); a server that died shows up again on the second try
    (refused: 502)."""
    for attempt in (1, 2):
        try:
            data = body if len(body) <= INLINE_BODY_BYTES else io.BytesIO(body)
            return await session.request(method, url, data=data, headers=headers,
                                         allow_redirects=False)
        except aiohttp.ServerDisconnectedError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def forward(session: aiohttp.ClientSession, request: web.Request, url: str, body: bytes,
                  headers: CIMultiDict[str], exchange: Exchange, what: str) -> web.StreamResponse:
    """Send `body` to `url` and stream the answer back to `request`'s client."""
    try:
        async with asyncio.timeout(FIRST_BYTE_S):
            upstream = await _send(session, request.method, url, body, headers)
    except TimeoutError:
        raise GatewayError(504, f"{what} sent no response headers within {FIRST_BYTE_S:g} s",
                           "upstream_timeout") from None
    except aiohttp.ClientError as exc:
        raise GatewayError(502, f"{what} did not answer ({exc}); `mi50ctl status` shows its "
                           "state", "upstream_unreachable") from None
    try:
        exchange.status = upstream.status
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in HOP_BY_HOP:
                response.headers.add(key, value)
        if upstream.content_length is not None and "Content-Encoding" not in upstream.headers:
            response.content_length = upstream.content_length
        response.headers["X-Accel-Buffering"] = "no"
        exchange.streamed = upstream.content_type == "text/event-stream"
        await response.prepare(request)
        pieces = aiter(upstream.content.iter_any())
        while True:
            try:
                chunk = await anext(pieces)
            except StopAsyncIteration:
                break
            except aiohttp.ClientError as exc:
                # The answer has begun: no error can be sent any more. Cut the client's
                # connection so it sees a truncated answer rather than a complete-looking one.
                log.warning("upstream_broke what=%s detail=%s", what, exc)
                return _cut(request, upstream, exchange, UPSTREAM_BROKE, response)
            if exchange.first_chunk_s is None:
                exchange.first_chunk_s = time.monotonic() - exchange.began
            exchange.tail.feed(chunk)
            try:
                if upstream.content.at_eof():  # the last piece: with the end, in one send
                    await response.write_eof(chunk)
                    return response
                await response.write(chunk)
            except ConnectionError:  # the client left (aiohttp's ClientConnectionResetError)
                return _cut(request, upstream, exchange, CLIENT_LEFT, response)
        try:
            await response.write_eof()
        except ConnectionError:
            return _cut(request, upstream, exchange, CLIENT_LEFT, response)
        return response
    except BaseException:
        upstream.close()  # not released to the pool: closing it is what tells llama-server
        raise
    finally:
        upstream.release()


def _cut(request: web.Request, upstream: aiohttp.ClientResponse, exchange: Exchange, why: str,
         response: web.StreamResponse) -> web.StreamResponse:
    """End a begun answer without its end: close both connections (the upstream one is never
    returned to the pool: closing it is what tells llama-server to stop generating). The
    response goes back to aiohttp, which finds the transport closed and only logs the access:
    a client that leaves, or an upstream that breaks, is no error of the gateway's."""
    exchange.cut = why
    if request.transport is not None:
        request.transport.close()
    upstream.close()
    return response
