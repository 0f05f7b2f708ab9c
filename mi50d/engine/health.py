"""One probe of an instance's health path over HTTP/1.1 -> HealthResult. No retries, no loop.

A hand-written GET keeps the daemon free of an HTTP client dependency; llama-server answers
`/health` with 200 when ready and 503 `{"error":{"message":"Loading model"}}` while loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    status: int | None  # HTTP status, None when no answer
    detail: str  # "200", "503 Loading model", "connection refused", "timed out after 3s"


async def probe(host: str, port: int, path: str, timeout_s: float) -> HealthResult:
    """GET `path`; ok only on status 200. Never raises for network trouble."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            status_line = await reader.readline()
            body = b""
            status = _status(status_line)
            if status is not None and status != 200:
                body = await _read_body(reader)
    except TimeoutError:
        return HealthResult(False, None, f"timed out after {timeout_s:g}s")
    except ConnectionRefusedError:
        return HealthResult(False, None, "connection refused")
    except OSError as exc:
        return HealthResult(False, None, exc.strerror or type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if status is None:
        return HealthResult(False, None, "not an HTTP answer")
    detail = str(status) if status == 200 else f"{status} {_message(body)}".strip()
    return HealthResult(status == 200, status, detail)


def _status(line: bytes) -> int | None:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1])


async def _read_body(reader: asyncio.StreamReader) -> bytes:
    data = await reader.read(4096)
    _head, _, body = data.partition(b"\r\n\r\n")
    return body


def _message(body: bytes) -> str:
    """The `error.message` of a llama-server JSON error, else a short piece of the body."""
    try:
        doc = json.loads(body)
        return str(doc["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:80].decode("utf-8", "replace").strip()
