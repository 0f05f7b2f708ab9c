"""Adoption on start: what mi50d does with the `mi50d@*.service` units it finds.

`survey(spawner)` (blocking, before the instances' loops run) reads every instance unit; then
`adopt(supervisor, found)` (synchronous, right after `Supervisor.launch`, before any await, so
no loop has run its first turn yet) decides for each one:

- running, its instance still configured: the instance's goal is up and its next start skips
  preflight (the port is its own) and goes to `UnitSpawner.spawn`, which keeps the unit when its
  recorded launch is what the configuration says now, and replaces it otherwise;
- running, its file removed: stopped (`stop_orphans`, a task of its own);
- dead while mi50d was down (failed): the restart policy decides as if mi50d had seen the
  crash; started again when it says so, else the instance stays FAILED with the cause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from mi50d.engine import policy
from mi50d.engine.desired import Kind
from mi50d.engine.states import Outcome, State
from mi50d.engine.supervisor import Supervisor, UnknownInstance
from mi50d.engine.unitbus import UnitState, instance_of
from mi50d.engine.units import UnitSpawner

log = logging.getLogger("mi50d.engine.adopt")


@dataclass(frozen=True)
class Found:
    instance: str
    state: UnitState


def survey(spawner: UnitSpawner) -> list[Found]:
    """Blocking: every loaded `mi50d@*.service` and its state."""
    m = spawner.manager()
    found = []
    for unit in m.instance_units():
        name = instance_of(unit)
        state = m.state(unit)
        if name is not None and state is not None:
            found.append(Found(name, state))
    return found


def adopt(supervisor: Supervisor, found: list[Found]) -> list[str]:
    """Take over the running units of configured instances; return the units to stop."""
    orphans: list[str] = []
    for f in found:
        try:
            inst = supervisor.get(f.instance)
        except UnknownInstance:
            if f.state.active in ("active", "activating", "failed"):
                log.info("instance_unit_orphaned unit=%s: its file is gone; stopping it",
                         f.state.name)
                orphans.append(f.state.name)
            continue
        if f.state.active in ("active", "activating") and f.state.main_pid:
            log.info("instance_unit_found unit=%s pid=%d", f.state.name, f.state.main_pid)
            inst.adopting = True
            inst.request(Kind.START)
        elif f.state.active == "failed":
            _died_meanwhile(supervisor, inst.name, f.state)
    return orphans


def _died_meanwhile(supervisor: Supervisor, name: str, state: UnitState) -> None:
    inst = supervisor.get(name)
    code = -state.exit_status if state.exit_code in (2, 3) else state.exit_status
    outcome = Outcome.CLEAN if code == 0 else Outcome.CRASH
    decision = policy.decide(inst.config.restart, outcome, inst.history, time.monotonic())
    inst.history = decision.history
    inst.last_exit = f"signal {-code}" if code < 0 else f"exit {code}"
    detail = f"{state.name} ended while mi50d was down ({inst.last_exit}, {state.result})"
    log.info("instance_unit_dead unit=%s %s; %s", state.name, detail, decision.reason)
    if decision.delay_s is not None:
        inst.restarts += 1
        inst.request(Kind.START)
    else:
        inst.set_state(State.FAILED, f"{detail}; {decision.reason}")


async def stop_orphans(spawner: UnitSpawner, units: list[str]) -> None:
    """Stop units whose files were removed while mi50d was down (and clear failed ones)."""
    m = spawner.manager()
    for unit in units:
        try:
            await asyncio.to_thread(m.stop, unit)
            await asyncio.to_thread(m.reset_failed, unit)
        except Exception as exc:
            log.warning("instance_unit_stop_failed unit=%s: %s", unit, exc)
