"""The few things the gateway asks of the engine, in one adapter over `Supervisor` (its
desired-state calls `ensure_running`/`ensure_stopped` and the instances' state).

Everything goes by instance name (a reload replaces Instance objects); no other gateway module
calls the engine.
"""

from __future__ import annotations

from collections.abc import Callable

from mi50d.config import Config, InstanceConfig
from mi50d.engine.desired import Verdict
from mi50d.engine.states import State
from mi50d.engine.supervisor import Supervisor

UP = frozenset({State.RUNNING, State.UNHEALTHY})


class Instances:
    def __init__(self, supervisor: Supervisor) -> None:
        self._sup = supervisor

    @property
    def config(self) -> Config:
        return self._sup.config

    def conf(self, name: str) -> InstanceConfig:
        return self._sup.get(name).config

    def state(self, name: str) -> State:
        return self._sup.get(name).state

    def is_up(self, name: str) -> bool:
        return self._sup.get(name).state in UP

    def coming_up(self, name: str) -> bool:
        """Wanted up and on its way (starting, or backing off before a restart)."""
        inst = self._sup.get(name)
        return inst.wanted and inst.state not in UP

    def pid(self, name: str) -> int | None:
        return self._sup.get(name).pid

    def why_down(self, name: str) -> str:
        inst = self._sup.get(name)
        text = f"{inst.state}: {inst.reason}"
        if inst.diagnosis and inst.diagnosis not in text:
            text += f"; {inst.diagnosis}"
        return text

    async def ensure_running(self, name: str, timeout_s: float) -> None:
        """Ask for it up and wait until it is up, or it gave up, was stopped or removed; a
        TimeoutError after `timeout_s` (the request stands)."""
        reply = await self._sup.ensure_running(name, timeout_s)
        if reply.verdict is Verdict.TIMEOUT:
            raise TimeoutError

    async def ensure_stopped(self, name: str) -> None:
        """Ask for it down and wait until no process of it is left (a later start may win)."""
        await self._sup.ensure_stopped(name)

    def holdings(self) -> dict[str, dict[int, int]]:
        """What every alive instance holds per GPU index (the KFD, else its logged buffers)."""
        return {o.name: dict(o.vram) for o in self._sup.others("") if o.vram}

    def on_change(self, hook: Callable[[], None]) -> None:
        self._sup.on_change.append(hook)
