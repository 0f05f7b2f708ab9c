"""Helpers for the gateway tests: a real Supervisor and a real gateway listening on a free port,
in one TaskGroup, and a recorder of state changes merged with the test's own notes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from mi50d.config import load_config
from mi50d.engine.supervisor import Supervisor
from mi50d.gateway.observer import NullObserver, Observer
from mi50d.gateway.service import GatewayService
from mi50d.host.accounts import account_for
from tests.support import Recorder

# `[gateway] workers` for every gateway_on of a test that uses the `fronts` fixture (conftest):
# each such test runs with the daemon serving every request itself, and again with two front
# processes in front of it.
FRONTS: int | None = None


class Timeline:
    """Every state change of every instance as `name:state`, in order, with notes the test adds
    (e.g. `kfd:released a`) in between: the order of events across instances."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.events: list[str] = []
        self._last: dict[str, str] = {}
        self._stack = contextlib.ExitStack()
        self._sub = self._stack.enter_context(supervisor.events.subscribe(size=100_000))

    def note(self, text: str) -> None:
        """Add `text` after every state change published so far (it wakes `wait`, too)."""
        self._sub.offer({"event": "note", "text": text})

    def _drain(self) -> None:
        while not self._sub.queue.empty():
            self._take(self._sub.queue.get_nowait())

    def _take(self, event: dict[str, Any]) -> None:
        if event["event"] == "note":
            self.events.append(event["text"])
        if event["event"] != "state":
            return
        st = event["status"]
        if self._last.get(st["name"]) != st["state"]:
            self._last[st["name"]] = st["state"]
            self.events.append(f"{st['name']}:{st['state']}")

    def count(self, entry: str) -> int:
        """How often `entry` happened up to now."""
        self._drain()
        return self.events.count(entry)

    async def wait(self, entry: str, count: int = 1, timeout: float = 120) -> None:
        """Until `entry` (e.g. `a:running`) has happened `count` times in all."""
        async with asyncio.timeout(timeout):
            while True:
                self._drain()
                if self.events.count(entry) >= count:
                    return
                self._take(await self._sub.get())

    def close(self) -> None:
        self._stack.close()


@contextlib.asynccontextmanager
async def gateway_on(directory: Path, observer: Observer | None = None,
                     extra_routes: Sequence[web.RouteDef] = (),
                     ) -> AsyncIterator[tuple[Supervisor, Recorder, GatewayService]]:
    """A Supervisor and a GatewayService on `directory` (its mi50d.toml sets [gateway] listen),
    shut down in the daemon's order on exit."""
    config = load_config(directory)
    sup = Supervisor(config, account_for(config))
    rec = Recorder(sup)
    settings = config.daemon.gateway
    if FRONTS is not None:
        settings = settings.model_copy(update={"workers": FRONTS})
    gw = GatewayService(settings, sup, observer, extra_routes)
    await gw.open()
    try:
        async with asyncio.TaskGroup() as tg:
            sup.launch(tg)
            gw.launch(tg)
            try:
                yield sup, rec, gw
            finally:
                await gw.close()
                await sup.shutdown()
    finally:
        rec.close()
        await gw.close()


class Codes(NullObserver):
    """The code each finished request was counted under."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.changed = asyncio.Event()

    def request_finished(self, model: str, code: int, duration_s: float, ttft_s: float | None,
                         prompt_tokens: int | None, generated_tokens: int | None) -> None:
        self.codes.append(code)
        self.changed.set()
