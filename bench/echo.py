"""The floor of answering on a Unix socket from Python: a uvloop server that answers every request
line with a fixed reply of a given size, doing nothing else. Run as
`python -m bench.echo SOCKET REPLY_BYTES`; it serves until SIGTERM (or 30 minutes at most)."""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

LIFETIME_S = 1800.0


async def serve(path: str, size: int) -> None:
    reply = b'{"v":1,"id":0,"ok":true,"result":"' + b"x" * max(size - 36, 0) + b'"}\n'

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1_000_000):
                line = await reader.readline()
                if not line:
                    break
                writer.write(reply)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(answer, path)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        print("ready", flush=True)
        try:
            async with asyncio.timeout(LIFETIME_S):
                await stop.wait()
        except TimeoutError:
            pass


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], int(sys.argv[2])))
