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


MAX_ANSWER = 64 * 1024  # a health answer is a few bytes; more is not a llama-server


async def probe(host: str, port: int, path: str, timeout_s: float) -> HealthResult:
    """GET `path` and read the whole answer (head and body) within `timeout_s`; ok only on status
    200. Never raises for network trouble or a malformed answer; anything else (a host name that
    cannot be encoded, say) is the caller's to handle."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_ANSWER)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = _status(head.split(b"\r\n", 1)[0])
            body = await _read_body(reader, _content_length(head))
    except TimeoutError:
        return HealthResult(False, None, f"timed out after {timeout_s:g}s")
    except ConnectionRefusedError:
        return HealthResult(False, None, "connection refused")
    except asyncio.LimitOverrunError:
        return HealthResult(False, None, f"not an HTTP answer (head over {MAX_ANSWER} bytes)")
    except asyncio.IncompleteReadError:
        return HealthResult(False, None, "connection closed mid-answer")
    except _TooLarge:
        return HealthResult(False, None, f"answer over {MAX_ANSWER} bytes")
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


class _TooLarge(Exception):
    pass


def _status(line: bytes) -> int | None:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1][:3])


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() and len(value) < 10 else -1
    return None


async def _read_body(reader: asyncio.StreamReader, length: int | None) -> bytes:
    """The body: `length` bytes, or (no length given) up to the end of the connection."""
    if length is not None and not 0 <= length <= MAX_ANSWER:
        raise _TooLarge
    if length is not None:
        return await reader.readexactly(length)
    body = b""
    while len(body) <= MAX_ANSWER:
        more = await reader.read(MAX_ANSWER + 1 - len(body))
        if not more:
            return body
        body += more
    raise _TooLarge


def _message(body: bytes) -> str:
    """The `error.message` of a llama-server JSON error, else a short piece of the body."""
    try:
        doc = json.loads(body)
        return str(doc["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:80].decode("utf-8", "replace").strip()
