"""The daemon's side of the gateway front processes (`[gateway] workers = N`, mi50d.gateway.front
says why and how they route).

`Fronts` binds the N listening sockets (SO_REUSEPORT on one address: a taken port fails here,
in the daemon, before READY=1), keeps one front process per socket (started again after a
second when one exits), and keeps each front's view current: whenever an instance changes state
or the gateway starts or ends a swap or an idle unload it sends the routing state to every
front if it changed. `closed()` is what a swap or an unload awaits after marking its victim:
every front acknowledged the state without it, so their counts in flight, added to the
daemon's own by `OnDemand.remote`, are complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mi50d
from mi50d.gateway import channel
from mi50d.gateway.observer import Observer
from mi50d.gateway.ondemand import OnDemand

log = logging.getLogger("mi50d.gateway.fronts")

RESPAWN_S = 1.0  # after a front exits, before the next one: a crash loop costs little
EXIT_WAIT_S = 5.0  # how long closing waits for a front to leave after its channel closed

StateOf = Callable[[], dict[str, Any]]


def listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on one address, the kernel spreading connections over them;
    OSError as bind raises it (a port taken by another program fails on the first)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    out: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(1024)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


class _Link:
    """One front: its process, its channel and what it last said."""

    def __init__(self, proc: asyncio.subprocess.Process, writer: asyncio.StreamWriter) -> None:
        self.proc = proc
        self.writer = writer
        self.acked = 0
        self.counts: dict[str, int] = {}


class Fronts:
    def __init__(self, sockets: list[socket.socket], internal: str, max_body: int,
                 state_of: StateOf, ondemand: OnDemand, observer: Observer) -> None:
        self._sockets = sockets
        self._internal = internal
        self._max_body = max_body
        self._state_of = state_of
        self._ondemand = ondemand
        self._observer = observer
        self._links: dict[int, _Link] = {}
        self._seq = 0
        self._sent: dict[str, Any] | None = None
        self._changed = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    def launch(self, tg: asyncio.TaskGroup) -> None:
        for index in range(len(self._sockets)):
            self._tasks.append(tg.create_task(self._keep(index), name=f"gateway:front{index}"))

    async def close(self) -> None:
        """End every front (its channel closes: it stops listening and exits), then the
        sockets; new connections are refused from here on."""
        self._closing = True
        for link in list(self._links.values()):
            link.writer.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(EXIT_WAIT_S):
                    await asyncio.shield(task)
            task.cancel()
        for sock in self._sockets:
            sock.close()

    def pids(self) -> list[int]:
        """The front processes running now."""
        return [link.proc.pid for link in self._links.values()]

    # ---- state -------------------------------------------------------------------------------

    def push(self) -> None:
        """Send the routing state to every front, if it changed."""
        state = self._state_of()
        if state == self._sent:
            return
        self._sent = state
        self._seq += 1
        line = channel.encode({"t": "state", "seq": self._seq, **state})
        for link in self._links.values():
            link.writer.write(line)

    async def closed(self) -> None:
        """Until every front acknowledged the state as it is now (a front that exits meanwhile
        counts as having acknowledged: its requests ended with it)."""
        self.push()
        seq = self._seq
        while any(link.acked < seq for link in self._links.values()):
            changed = self._changed
            await changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- one front ---------------------------------------------------------------------------

    async def _keep(self, index: int) -> None:
        while not self._closing:
            try:
                await self._run(index)
            except OSError as exc:
                log.error("gateway_front_failed front=%d error=%s", index, exc)
            if not self._closing:
                await asyncio.sleep(RESPAWN_S)

    async def _run(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        listen_fd = self._sockets[index].fileno()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mi50d.gateway.front", "--listen-fd", str(listen_fd),
                "--channel-fd", str(theirs.fileno()), "--internal", self._internal,
                "--max-body", str(self._max_body),
                "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(listen_fd, theirs.fileno()),
                env={**os.environ, "PYTHONPATH": _package_root()})
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=channel.LINE_LIMIT)
        link = _Link(proc, writer)
        self._links[index] = link
        log.info("gateway_front_started front=%d pid=%d", index, proc.pid)
        try:
            if self._sent is not None:
                writer.write(channel.encode({"t": "state", "seq": self._seq, **self._sent}))
            else:
                self.push()
            while (message := await channel.receive(reader)) is not None:
                self._take(link, message)
        finally:
            del self._links[index]
            self._ondemand.remote(link.counts, {})
            self._wake()
            writer.close()
            with contextlib.suppress(ProcessLookupError):
                if self._closing:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(EXIT_WAIT_S):
                            await proc.wait()
                if proc.returncode is None:
                    proc.kill()
            code = await proc.wait()
            if not self._closing:
                log.warning("gateway_front_exited front=%d pid=%d code=%s; starting another",
                            index, proc.pid, code)

    def _take(self, link: _Link, message: channel.Message) -> None:
        kind = message.get("t")
        if kind in ("ack", "counts"):
            counts = {str(k): int(v) for k, v in message["counts"].items()}
            self._ondemand.remote(link.counts, counts)
            link.counts = counts
            if kind == "ack":
                link.acked = max(link.acked, int(message["seq"]))
            self._wake()
        elif kind == "done":
            for model, code, duration, ttft, prompt, generated in message["requests"]:
                self._observer.request_started(model)
                self._observer.request_finished(model, code, duration, ttft, prompt, generated)


def _package_root() -> str:
    """Where the mi50d package lives, so the front imports the daemon's own code."""
    return str(Path(mi50d.__file__).resolve().parent.parent)
