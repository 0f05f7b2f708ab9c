"""llama.cpp's RPC hello: what a worker answers first, and which versions can talk.

The wire format is ggml-rpc.cpp's: a request is one command byte, an 8-byte little-endian size
and the payload; an answer is an 8-byte size and the payload. HELLO is command 14 and carries the
client's 24 bytes of transport capabilities (zeros: plain TCP); the answer is major, minor, patch,
one byte of padding and the server's capabilities. The server serves one client at a time, so a
worker that is busy with llama-server answers nobody else until that client leaves.

A client accepts a server of the same major version and a minor version no newer than its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

HELLO = 14
CAPS_SIZE = 24
REQUEST = struct.pack("<BQ", HELLO, CAPS_SIZE) + bytes(CAPS_SIZE)
ANSWER_SIZE = 4 + CAPS_SIZE


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


class HelloError(Exception):
    """No hello answer: refused, timed out, closed, or not an RPC server."""


class Busy(HelloError):
    """The worker accepted the connection but did not answer: it serves another client (or hangs)."""


def compatible(client: Version, server: Version) -> bool:
    """The check llama.cpp's client makes before it uses a worker."""
    return server.major == client.major and server.minor <= client.minor


def parse_answer(data: bytes) -> Version:
    """The version in a hello answer (its size field included); HelloError if it is none."""
    if len(data) < 8 + ANSWER_SIZE:
        raise HelloError(f"closed after {len(data)} bytes, before a whole hello answer")
    (size,) = struct.unpack_from("<Q", data)
    if size != ANSWER_SIZE:
        raise HelloError(f"answered a hello of {size} bytes, not {ANSWER_SIZE}: not a llama.cpp "
                         "RPC server of this protocol")
    return Version(*data[8:11])


def hello(host: str, port: int, timeout_s: float) -> Version:
    """Say hello and close; blocking, for preflight's worker thread."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(REQUEST)
            data = b""
            while len(data) < 8 + ANSWER_SIZE:
                more = sock.recv(8 + ANSWER_SIZE - len(data))
                if not more:
                    break
                data += more
    except TimeoutError:
        raise HelloError(f"no answer within {timeout_s:g}s (busy with another client, or hung)") \
            from None
    except OSError as exc:
        raise HelloError(exc.strerror or type(exc).__name__) from None
    return parse_answer(data)


async def hello_async(host: str, port: int, timeout_s: float) -> Version:
    """Say hello and close, on the event loop; HelloError with the cause. A connection that was
    accepted but got no answer in time says so ("busy or hung"), apart from one never made."""
    writer: asyncio.StreamWriter | None = None
    connected = False
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            connected = True
            writer.write(REQUEST)
            await writer.drain()
            data = await reader.readexactly(8 + ANSWER_SIZE)
    except TimeoutError:
        if connected:
            raise Busy(f"connected but no hello answer within {timeout_s:g}s") from None
        raise HelloError(f"no connection within {timeout_s:g}s") from None
    except asyncio.IncompleteReadError as exc:
        data = exc.partial
    except OSError as exc:
        raise HelloError(exc.strerror or type(exc).__name__) from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return parse_answer(data)


def binary_version(argv: Sequence[str], env: Mapping[str, str], port: int,
                   timeout_s: float) -> Version:
    """The protocol version an RPC server binary speaks, from its own hello: it is started on
    `port` of 127.0.0.1, asked, and killed. (Its banner, "Starting RPC server vX.Y.Z", is not
    flushed to a pipe before its first client, so asking is also the quicker way.)"""
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)], env=dict(env),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as proc:
        try:
            while True:
                left = deadline - time.monotonic()
                if proc.poll() is not None:
                    tail = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                    last = (tail.strip().splitlines() or ["no output"])[-1][:200]
                    raise HelloError(f"exited with status {proc.returncode} before it "
                                     f"answered: {last}")
                if left <= 0:
                    raise HelloError(f"did not answer a hello within {timeout_s:g}s")
                try:
                    return hello("127.0.0.1", port, min(left, 1.0))
                except HelloError:
                    time.sleep(min(0.02, max(left, 0)))
        finally:
            proc.kill()
