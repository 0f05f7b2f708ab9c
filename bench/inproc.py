"""A real Supervisor run inside the benchmark process, on uvloop like the daemon, with a clock
that notes the perf_counter() moment of every state change of every instance."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from mi50d.config import load_config
from mi50d.engine.supervisor import Supervisor
from mi50d.host.accounts import account_for


class StateClock:
    """Hooked into `Supervisor.on_change`: (state, perf_counter) per instance, in order; the
    moment a new pid is first reported is logged as the pseudo-state "spawned"."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._seen: dict[str, str] = {}
        self._pids: dict[str, int | None] = {}
        self.log: dict[str, list[tuple[str, float]]] = {}
        self._event = asyncio.Event()
        sup.on_change.append(self._hook)

    def _hook(self) -> None:
        now = time.perf_counter()
        for name in self._sup.names():
            inst = self._sup.get(name)
            state = str(inst.state)
            if self._seen.get(name) != state:
                self._seen[name] = state
                self.log.setdefault(name, []).append((state, now))
            if inst.pid is not None and self._pids.get(name) != inst.pid:
                self.log.setdefault(name, []).append(("spawned", now))
            self._pids[name] = inst.pid
        self._event.set()

    def count(self, name: str, state: str) -> int:
        return sum(1 for s, _ in self.log.get(name, []) if s == state)

    def last(self, name: str, state: str) -> float:
        return max(t for s, t in self.log[name] if s == state)

    async def wait(self, names: list[str], state: str, counts: dict[str, int],
                   seconds: float) -> float:
        """Until every name entered `state` `counts[name]` times; the latest such moment."""
        async with asyncio.timeout(seconds):
            while not all(self.count(n, state) >= counts.get(n, 1) for n in names):
                self._event.clear()
                await self._event.wait()
        return max(self.last(n, state) for n in names)


@contextlib.asynccontextmanager
async def supervised(directory: Path) -> AsyncIterator[tuple[Supervisor, StateClock]]:
    config = load_config(directory)
    sup = Supervisor(config, account_for(config))
    clock = StateClock(sup)
    async with asyncio.TaskGroup() as tg:
        sup.launch(tg)
        try:
            yield sup, clock
        finally:
            async with asyncio.timeout(120):
                await sup.shutdown()
