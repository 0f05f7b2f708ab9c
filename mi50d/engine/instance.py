"""One supervised llama-server instance: its state machine, its requests and its owner loop.

Requests (`request`, `reconfigure`) only record the goal and return a ticket (see
`engine.desired` for the table); the loop here is the one owner of the process and the
configuration. It reads as a sentence: take a new configuration if one waits -> if the goal is
down, settle the stops and wait for a request -> else preflight -> spawn -> wait for the first of
(exit | hang or start timeout | a request that interrupts) -> ask the restart policy -> back off
-> again. Every state change goes through `set_state`, is checked against `states.TRANSITIONS`
and is logged once as `state_changed`. An exception anywhere in one turn of the loop becomes this
instance's FAILED state with the cause in one line, and the loop goes on taking requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from mi50d.config import DaemonConfig, InstanceConfig
from mi50d.engine import policy
from mi50d.engine.desired import INTERRUPTED_BY, Goal, Kind, Pending, Ticket, Verdict
from mi50d.engine.output import Lines
from mi50d.engine.process import GONE_S, Child, SpawnSpec, describe_status, spawn
from mi50d.engine.run import (
    READ_LINES_TIMEOUT_S,
    Ended,
    Hooks,
    Preflight,
    bounded,
    first_of,
    health_watch,
    one_line,
)
from mi50d.engine.states import ALIVE, Outcome, State, check_transition
from mi50d.engine.unitbus import unit_name
from mi50d.engine.units import UnitChild
from mi50d.host import firewall
from mi50d.host.accounts import Account
from mi50d.host.checks import Transient

log = logging.getLogger("mi50d.engine.instance")

KEEP_LINES_ON_FAILURE = 20

@dataclass(frozen=True)
class _NextConfig:
    config: InstanceConfig
    daemon: DaemonConfig
    account: Account | None
    hold: asyncio.Event | None  # the start waits for this (a reload's other stops) when given


class Instance:
    def __init__(
        self,
        config: InstanceConfig,
        daemon: DaemonConfig,
        account: Account | None,
        on_change: Callable[[Instance], None],
        on_line: Callable[[Instance, str], None],
        hooks: Hooks | None = None,
        hold: asyncio.Event | None = None,
    ) -> None:
        self.config = config
        self.daemon = daemon
        self.account = account
        self._on_change = on_change
        self._on_line = on_line
        self.hooks = hooks or Hooks()
        self.state = State.STOPPED
        self.reason = "not started"
        self.since = time.time()
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self.diagnosis: str | None = None
        self.last_lines: tuple[str, ...] = ()
        self.logged_vram: dict[int, int] = {}  # buffer sizes it logged while loading, per GPU
        self.lines = Lines(daemon.log_lines)
        self.history = policy.History()
        self.goal = Goal.DOWN
        self.pending = Pending()
        self._running_since: float | None = None
        self._why = INTERRUPTED_BY[Kind.STOP]
        self._next: _NextConfig | None = None
        self._hold = hold  # a start waits for this (a reload's stops) while it is not set
        self._wake = asyncio.Event()  # a request arrived (the idle loop waits on it)
        self._interrupt = asyncio.Event()  # the current attempt or backoff must end
        self._hurry = asyncio.Event()  # stop without waiting out stop.timeout_s
        self._line = asyncio.Event()  # the child printed something
        self._ended = asyncio.Event()  # the loop has returned
        self._preflight = Preflight(config.name)
        # Adoption (engine.adopt): a unit of this instance runs already; the next start skips
        # preflight (the port is its own) and keeps the process' own start as its uptime's.
        self.adopting = False
        self._since_hint: float | None = None

    # ---- requests (synchronous: recorded before the caller's next await) ---------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def wanted(self) -> bool:
        """The goal is up: a start, restart or autostart is the latest word."""
        return self.goal is Goal.UP

    def uptime_s(self) -> float | None:
        if self._running_since is None:
            return None
        return time.monotonic() - self._running_since

    def request(self, kind: Kind) -> Ticket:
        """Record a start, restart, stop or close; the returned ticket resolves as
        `engine.desired` says."""
        ticket = Ticket(kind, self._now)
        self.pending.add(ticket)
        if self.goal is Goal.CLOSED or self._ended.is_set():
            if kind in (Kind.START, Kind.RESTART):
                ticket.resolve(Verdict.REMOVED, self.state, "the instance was removed")
            elif self._ended.is_set():
                ticket.resolve(Verdict.REACHED, self.state, self.reason)
            return ticket
        if kind in (Kind.START, Kind.RESTART) and self.goal is not Goal.UP:
            self.history = policy.History()  # a user start leaves FAILED with a fresh history
        if kind is Kind.START:
            self.goal = Goal.UP
            if self.state in (State.RUNNING, State.UNHEALTHY) and not self._interrupt.is_set():
                ticket.resolve(Verdict.REACHED, self.state, self.reason)
        elif kind is Kind.RESTART:
            self.goal = Goal.UP
            self._interrupt_for(kind)
        elif kind is Kind.STOP:
            self.goal = Goal.DOWN
            self._interrupt_for(kind)
        elif kind is Kind.CLOSE:
            self.goal = Goal.CLOSED
            self._interrupt_for(kind)
        self._wake.set()
        return ticket

    def reconfigure(self, config: InstanceConfig, daemon: DaemonConfig, account: Account | None,
                    hold: asyncio.Event | None = None) -> Ticket:
        """Replace the launch: the loop stops a process of the old one, takes `config`, and (goal
        still up) starts again once `hold` is set. Resolves when the new one is in place."""
        ticket = Ticket(Kind.RECONFIGURE, self._now)
        self.pending.add(ticket)
        if self._ended.is_set():
            ticket.resolve(Verdict.REMOVED, self.state, "the instance was removed")
            return ticket
        self._next = _NextConfig(config, daemon, account, hold)
        self._interrupt_for(Kind.RECONFIGURE)
        self._wake.set()
        return ticket

    def planned(self) -> tuple[InstanceConfig, DaemonConfig, Account | None]:
        """The configuration in place once a pending reconfigure is taken."""
        if self._next is not None:
            return self._next.config, self._next.daemon, self._next.account
        return self.config, self.daemon, self.account

    def update(self, config: InstanceConfig, daemon: DaemonConfig) -> None:
        """A reload that leaves the launch as it is: take the new objects (source path, daemon
        settings such as `preflight` and `[host]`) for the next attempt, without a restart."""
        if self._next is not None:
            self._next = _NextConfig(config, daemon, self._next.account, self._next.hold)
            return
        self.config, self.daemon = config, daemon
        self.lines.resize(daemon.log_lines)

    def hurry(self) -> None:
        """From now on stops do not wait out stop.timeout_s: SIGKILL at once."""
        self._hurry.set()

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop for good and wait (bounded) until the loop has returned."""
        ticket = self.request(Kind.CLOSE)
        await ticket.wait(self.stop_bound_s() if timeout_s is None else timeout_s)

    def stop_bound_s(self) -> float:
        """How long a stop can take at most: SIGTERM's grace, SIGKILL, the group's stragglers."""
        return self.config.stop.timeout_s + 2 * GONE_S + 5.0

    def _interrupt_for(self, kind: Kind) -> None:
        self._why = INTERRUPTED_BY[kind]
        self._interrupt.set()

    def _now(self) -> tuple[State, str]:
        return self.state, self.reason

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        self._notify()  # the first state, for event readers
        try:
            while await self._turn():
                pass
        finally:
            self._ended.set()
            self.pending.resolve({Kind.STOP, Kind.CLOSE}, Verdict.REACHED, self.state, self.reason)
            self.pending.resolve({Kind.START, Kind.RESTART, Kind.RECONFIGURE}, Verdict.REMOVED,
                                 self.state, "the instance was removed")

    async def _turn(self) -> bool:
        """One turn of the loop; False once closed. Nothing raised in it ends the loop."""
        try:
            return await self._reconcile()
        except Exception as exc:
            self._internal_error(exc)
            return True

    async def _reconcile(self) -> bool:
        # Everything asked so far is seen below, with no await before it: an interrupt that
        # arrives later is a new request and is set again.
        self._interrupt.clear()
        self._take_config()
        if self.goal is Goal.CLOSED:
            if self.state not in (State.STOPPED, State.FAILED):
                self.set_state(State.STOPPED, self._why)
            return False
        if self.goal is Goal.DOWN:
            self.pending.resolve({Kind.STOP}, Verdict.REACHED, self.state, self.reason)
            self._wake.clear()
            await self._wake.wait()
            return True
        if self._hold is not None:
            if not self._hold.is_set():
                await first_of(self._hold.wait(), self._interrupt.wait())
                return True
            self._hold = None
        ended = await self._attempt()
        if ended is None:  # a request interrupted it; no process is left
            if self.state is not State.STOPPED:
                self.set_state(State.STOPPED, self._why)
            return True
        await self._after(ended)
        return True

    def _take_config(self) -> None:
        if self._next is None:
            return
        nxt, self._next = self._next, None
        self.config, self.daemon, self.account = nxt.config, nxt.daemon, nxt.account
        self.lines.resize(nxt.daemon.log_lines)
        self._hold = nxt.hold
        self.pending.resolve({Kind.RECONFIGURE}, Verdict.REACHED, self.state,
                             "the new configuration is in place")

    async def _after(self, ended: Ended) -> None:
        """Ask the restart policy; give up, or back off (a request may cut the delay short)."""
        decision = policy.decide(self.config.restart, ended.outcome, self.history,
                                 time.monotonic(), ended.healthy_for_s)
        self.history = decision.history
        if decision.delay_s is None:
            final = State.STOPPED if ended.outcome in (Outcome.CLEAN, Outcome.STOPPED_BY_SYSTEMD) \
                else State.FAILED
            self._give_up(final, f"{ended.detail}; {decision.reason}")
            return
        self.set_state(State.BACKOFF, f"{ended.detail}; {decision.reason}")
        if ended.outcome is Outcome.RESTARTED_BY_SYSTEMD:
            self.adopting = True  # the unit's new process: adopted, as after a restart of mi50d
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(decision.delay_s):
                await self._interrupt.wait()
        if not self._interrupt.is_set():
            self.restarts += 1
        elif self.goal is not Goal.UP:
            self.set_state(State.STOPPED, self._why)

    def _give_up(self, final: State, reason: str) -> None:
        """The loop itself decides to stay down: pending starts are answered `failed`."""
        if self.goal is Goal.UP:
            self.goal = Goal.DOWN
        if self.state is final:
            self.reason = reason
            self._notify()
        else:
            self.set_state(final, reason)
        self.pending.resolve({Kind.START, Kind.RESTART}, Verdict.FAILED, self.state, reason)

    def _internal_error(self, exc: Exception) -> None:
        log.exception("instance_unexpected_error instance=%s", self.name)
        cause = f"unexpected error in mi50d ({one_line(exc)})"
        self.pid = None
        self._running_since = None
        self.diagnosis = cause
        self._give_up(State.FAILED, f"{cause}; see the journal")

    async def _attempt(self) -> Ended | None:
        """One start: preflight, spawn, watch. None: a request interrupted it (no process left)."""
        config, daemon = self.config, self.daemon
        job = None if self.adopting else self.hooks.preflight_job(config, daemon, self.account)
        self.adopting = False
        self.set_state(State.STARTING, "preflight" if job else "spawning")
        if job is not None:
            problem = await self._preflight.run(job, self._interrupt)
            if self._interrupt.is_set():
                return None  # asked to stop meanwhile: nothing is spawned
            if problem is not None:
                self.diagnosis = problem
                outcome = Outcome.START_FAILED if isinstance(problem, Transient) else Outcome.FATAL
                return Ended(outcome, f"preflight failed: {problem}")
        networks = config.client_networks()
        guard = None
        try:
            if networks and self.hooks.spawn is None:  # a direct child: mi50d installs the table
                await asyncio.to_thread(firewall.install, config.name, config.port, networks)
            elif networks:  # a unit: the unit installs it (privileged ExecStartPre=)
                guard = firewall.unit_commands(config.name, config.port, networks)
        except firewall.FirewallError as exc:
            self.diagnosis = f"allow: {exc}"
            return Ended(Outcome.FATAL, self.diagnosis)
        spec = SpawnSpec(
            argv=config.argv(daemon),
            env=config.environment(
                {**os.environ, **(self.account.environment() if self.account else {})}, daemon),
            account=self.account,
            on_line=self._take_line,
            allow=networks,
            guard=guard,
            writable=tuple(str(d) for d in [config.cache_dir(daemon)] if d is not None),
        )
        self.diagnosis = None
        self.logged_vram = {}
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    launch = (spawn(spec, config.stop.timeout_s, self._hurry)
                              if self.hooks.spawn is None else
                              self.hooks.spawn(self.name, spec, config.stop.timeout_s, self._hurry))
                    child: Child | UnitChild = await stack.enter_async_context(launch)
                except OSError as exc:
                    return Ended(Outcome.FATAL,
                                 f"cannot execute {spec.argv[0]}: {exc.strerror or exc}")
                except ValueError as exc:  # a NUL byte or an '=' in the environment, say
                    return Ended(Outcome.FATAL, f"cannot start {spec.argv[0]!r}: {exc}")
                self.pid = child.pid
                self.reason = f"spawned pid {child.pid}; loading"
                if isinstance(child, UnitChild) and child.adopted:
                    self.reason = f"adopted {child.unit} (pid {child.pid}); probing"
                    self._since_hint = child.started_monotonic
                self._notify()
                log.info("instance_spawned instance=%s pid=%d argv=%s", self.name, child.pid,
                         " ".join(spec.argv))
                return await self._watch(child)
        finally:
            self.pid = None
            self._running_since = None
            self._since_hint = None
            if networks and self.hooks.spawn is None:  # the direct child is gone: its table too
                await asyncio.to_thread(firewall.remove, config.name)

    async def _watch(self, child: Child | UnitChild) -> Ended | None:
        pump = asyncio.create_task(child.pump_output())
        exited = asyncio.create_task(child.wait())
        health = asyncio.create_task(health_watch(self))
        stop = asyncio.create_task(self._interrupt.wait())
        try:
            await asyncio.wait({exited, health, stop}, return_when=asyncio.FIRST_COMPLETED)
            healthy_for = self.uptime_s() or 0.0
            if stop.done():
                self.set_state(State.STOPPING, f"{self._why}: SIGTERM")
                status = await child.terminate(self.config.stop.timeout_s, self._hurry)
                self.last_exit = describe_status(status)
                return None
            if exited.done():
                status = exited.result()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # the rest of its output
                        await pump
                return await self._exit_outcome(status, healthy_for, child.ended_by)
            outcome, detail = health.result()  # raises what the probe could not handle
            status = await child.kill()
            self.last_exit = describe_status(status)
            return await self._failure(outcome, f"{detail}; killed", healthy_for)
        finally:
            for task in (pump, exited, health, stop):
                task.cancel()
            await asyncio.gather(pump, exited, health, stop, return_exceptions=True)

    async def _exit_outcome(self, status: int, healthy_for: float, ended_by: str | None) -> Ended:
        self.last_exit = describe_status(status)
        if ended_by == "stop":
            return Ended(Outcome.STOPPED_BY_SYSTEMD,
                         f"stopped through systemd (systemctl stop {unit_name(self.name)}); "
                         f"mi50ctl start {self.name} starts it again", healthy_for)
        if ended_by == "restart":
            return Ended(Outcome.RESTARTED_BY_SYSTEMD,
                         f"restarted through systemd (systemctl restart {unit_name(self.name)})",
                         healthy_for)
        if self.state is State.STARTING:
            return await self._failure(Outcome.START_FAILED,
                                       f"exited during start ({self.last_exit})", healthy_for)
        if status == 0:
            return Ended(Outcome.CLEAN, "exited cleanly (exit 0)", healthy_for)
        return await self._failure(Outcome.CRASH, f"crashed ({self.last_exit})", healthy_for)

    async def _failure(self, outcome: Outcome, detail: str, healthy_for: float) -> Ended:
        self.last_lines = tuple(self.lines.tail(KEEP_LINES_ON_FAILURE))
        diagnose = self.hooks.diagnose_of(self.config)
        if diagnose is not None:
            found = await bounded(diagnose, self.last_lines, READ_LINES_TIMEOUT_S)
            if found is not None:
                self.diagnosis, fatal = found
                detail = f"{detail}: {self.diagnosis}"
                if fatal:
                    outcome = Outcome.FATAL
        return Ended(outcome, detail, healthy_for)

    # ---- bookkeeping (also used by engine.run) -----------------------------------------------

    def mark_ready(self, how: str) -> None:
        self._running_since = self._since_hint or time.monotonic()
        self._since_hint = None
        self.set_state(State.RUNNING, how)

    def line_event(self) -> asyncio.Event:
        return self._line

    def _take_line(self, line: str) -> None:
        self.lines.append(line)
        self._line.set()
        self._on_line(self, line)

    def set_state(self, new: State, reason: str) -> None:
        """The one way the state changes; only the owner loop (here and engine.run) calls it."""
        old = self.state
        check_transition(old, new)
        self.state = new
        self.reason = reason
        self.since = time.time()
        if new not in ALIVE:
            self._running_since = None
        log.info("state_changed instance=%s old=%s new=%s reason=%s", self.name, old, new, reason)
        if new is State.STARTING:
            self.pending.resolve({Kind.RESTART}, Verdict.REACHED, new, reason)
        elif new is State.RUNNING:
            self.pending.resolve({Kind.START}, Verdict.REACHED, new, reason)
        self._notify()

    def _notify(self) -> None:
        try:
            self._on_change(self)
        except Exception:  # a view's bug must not stop the loop
            log.exception("state_hook_failed instance=%s", self.name)
