"""One supervised llama-server instance: its state machine and its run loop.

The loop reads as a sentence: wait until wanted -> preflight -> spawn -> wait for the first of
(exit | hang or start timeout | stop request) -> ask the restart policy -> back off -> again.
Every state change goes through `_set_state`, is checked against `states.TRANSITIONS` and is
logged once as `state_changed`. Exits are awaited (`Process.wait`), never polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mi50d.config import DaemonConfig, InstanceConfig
from mi50d.engine import policy
from mi50d.engine.health import probe
from mi50d.engine.process import Child, SpawnSpec, describe_status, spawn
from mi50d.engine.states import ALIVE, Outcome, State, check_transition
from mi50d.host.accounts import Account

log = logging.getLogger("mi50d.engine.instance")

KEEP_LINES_ON_FAILURE = 20
FIRST_PROBE_S = 0.01
MAX_START_PROBE_GAP_S = 0.25


@dataclass(frozen=True)
class Ended:
    """How one run ended (None from `_attempt` means: stopped on request)."""

    outcome: Outcome
    detail: str
    healthy_for_s: float = 0.0


# Called on the loop before every spawn; the job it returns runs in a worker thread and returns
# None, or one line: cause and fix.
Preflight = Callable[[InstanceConfig], Callable[[], str | None]]
# A reading of the last output lines after a failure: returns (one-line diagnosis, fatal) or None.
Diagnose = Callable[[Sequence[str]], tuple[str, bool] | None]


class Instance:
    def __init__(
        self,
        config: InstanceConfig,
        daemon: DaemonConfig,
        account: Account | None,
        on_change: Callable[[Instance], None],
        on_line: Callable[[Instance, str], None],
        preflight: Preflight | None = None,
        diagnose: Diagnose | None = None,
        degraded: Callable[[Sequence[str]], str | None] | None = None,
    ) -> None:
        self.config = config
        self.daemon = daemon
        self.account = account
        self._on_change = on_change
        self._on_line = on_line
        self._preflight = preflight
        self._diagnose = diagnose
        self._degraded = degraded
        self.state = State.STOPPED
        self.reason = "not started"
        self.since = time.time()
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self.diagnosis: str | None = None
        self.last_lines: tuple[str, ...] = ()
        self.lines: deque[str] = deque(maxlen=daemon.log_lines)
        self.history = policy.History()
        self._running_since: float | None = None
        self._wanted = False
        self._closed = False
        self._wake = asyncio.Event()  # a control request arrived
        self._stop = asyncio.Event()  # stop the current run
        self._line = asyncio.Event()  # the child printed something
        self._changed = asyncio.Event()  # set and replaced on every change (see wait_for)
        self._busy = False  # between leaving the idle wait and being idle again

    # ---- control (called by the supervisor) -------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def wanted(self) -> bool:
        """A user or autostart asked for it to be up (and nobody since asked for it down)."""
        return self._wanted

    def uptime_s(self) -> float | None:
        if self._running_since is None:
            return None
        return time.monotonic() - self._running_since

    def request_start(self) -> None:
        """Want it up. A user start also clears FAILED and the restart history."""
        if self.state in (State.FAILED, State.STOPPED):
            self.history = policy.History()
        self._wanted = True
        self._stop.clear()
        self._wake.set()

    async def stop(self) -> None:
        """Want it down; return once no process is left."""
        self._wanted = False
        self._stop.set()
        self._wake.set()
        await self.wait_for(lambda: self.state in (State.STOPPED, State.FAILED) and not
                            self._busy)

    async def close(self) -> None:
        """Stop for good: the run loop returns."""
        self._closed = True
        await self.stop()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds; re-checked on every state change."""
        while not predicate():
            await self._changed.wait()

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self._busy = False
            self._notify()
            while not (self._wanted or self._closed):
                self._wake.clear()
                await self._wake.wait()
            if self._closed:
                return
            self._busy = True
            ended = await self._attempt()
            if ended is None:
                if self.state is not State.STOPPED:
                    self._set_state(State.STOPPED, "stopped on request")
                continue
            decision = policy.decide(
                self.config.restart, ended.outcome, self.history, time.monotonic(),
                ended.healthy_for_s,
            )
            self.history = decision.history
            if decision.delay_s is None:
                self._wanted = False
                final = State.STOPPED if ended.outcome is Outcome.CLEAN else State.FAILED
                self._set_state(final, f"{ended.detail}; {decision.reason}")
                continue
            self._set_state(State.BACKOFF, f"{ended.detail}; {decision.reason}")
            if await self._stop_within(decision.delay_s):
                self._set_state(State.STOPPED, "stopped on request")
                continue
            self.restarts += 1

    async def _stop_within(self, delay_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._stop.wait()
        return self._stop.is_set()

    async def _attempt(self) -> Ended | None:
        if self._stop.is_set():
            return None
        self._set_state(State.STARTING, "preflight" if self._preflight else "spawning")
        if self._preflight is not None:
            problem = await asyncio.to_thread(self._preflight(self.config))
            if problem is not None:
                self.diagnosis = problem
                return Ended(Outcome.FATAL, f"preflight failed: {problem}")
        spec = SpawnSpec(
            argv=self.config.argv(self.daemon),
            env=self.config.environment(
                {**os.environ, **(self.account.environment() if self.account else {})}),
            account=self.account,
            on_line=self._take_line,
        )
        self.diagnosis = None
        try:
            async with spawn(spec, self.config.stop.timeout_s) as child:
                self.pid = child.pid
                self.reason = f"spawned pid {child.pid}; loading"
                self._notify()
                log.info("instance_spawned instance=%s pid=%d argv=%s", self.name, child.pid,
                         " ".join(spec.argv))
                return await self._watch(child)
        except OSError as exc:
            return Ended(Outcome.FATAL, f"cannot execute {spec.argv[0]}: {exc.strerror}")
        finally:
            self.pid = None
            self._running_since = None

    async def _watch(self, child: Child) -> Ended | None:
        pump = asyncio.create_task(child.pump_output())
        exited = asyncio.create_task(child.wait())
        health = asyncio.create_task(self._health())
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({exited, health, stop}, return_when=asyncio.FIRST_COMPLETED)
            healthy_for = self.uptime_s() or 0.0
            if stop.done():
                self._set_state(State.STOPPING, "stop requested: SIGTERM")
                status = await child.terminate(self.config.stop.timeout_s)
                self.last_exit = describe_status(status)
                return None
            if exited.done():
                status = exited.result()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # the rest of its output
                        await pump
                return self._exit_outcome(status, healthy_for)
            outcome, detail = health.result()
            status = await child.kill()
            self.last_exit = describe_status(status)
            return self._failure(outcome, f"{detail}; killed", healthy_for)
        finally:
            for task in (pump, exited, health, stop):
                task.cancel()
            await asyncio.gather(pump, exited, health, stop, return_exceptions=True)

    def _exit_outcome(self, status: int, healthy_for: float) -> Ended:
        self.last_exit = describe_status(status)
        if self.state is State.STARTING:
            return self._failure(Outcome.START_FAILED, f"exited during start ({self.last_exit})",
                                 healthy_for)
        if status == 0:
            return Ended(Outcome.CLEAN, "exited cleanly (exit 0)", healthy_for)
        return self._failure(Outcome.CRASH, f"crashed ({self.last_exit})", healthy_for)

    def _failure(self, outcome: Outcome, detail: str, healthy_for: float) -> Ended:
        self.last_lines = tuple(self.lines)[-KEEP_LINES_ON_FAILURE:]
        if self._diagnose is not None:
            found = self._diagnose(self.last_lines)
            if found is not None:
                self.diagnosis, fatal = found
                detail = f"{detail}: {self.diagnosis}"
                if fatal:
                    outcome = Outcome.FATAL
        return Ended(outcome, detail, healthy_for)

    async def _health(self) -> tuple[Outcome, str]:
        """Wait for the first 200, then watch; return only on a hang or a start timeout."""
        cfg = self.config.health
        try:
            async with asyncio.timeout(cfg.start_timeout_s):
                await self._until_ready()
        except TimeoutError:
            return Outcome.START_FAILED, f"not ready within start_timeout_s={cfg.start_timeout_s:g}"
        self._running_since = time.monotonic()
        if self._degraded is not None:
            self.diagnosis = self._degraded(tuple(self.lines))
        self._set_state(State.RUNNING, f"{cfg.path} answered 200")
        failures = 0
        host, port = self._probe_address()
        # Probes keep a fixed schedule (a slow, timed-out probe does not push the next one
        # back), so a hang is caught within interval_s * failures + timeout_s.
        clock = asyncio.get_running_loop().time
        due = clock()
        while True:
            due = max(due + cfg.interval_s, clock())
            await asyncio.sleep(due - clock())
            result = await probe(host, port, cfg.path, cfg.timeout_s)
            if result.ok:
                if failures:
                    log.info("health_recovered instance=%s", self.name)
                failures = 0
                if self.state is State.UNHEALTHY:
                    self._set_state(State.RUNNING, f"{cfg.path} answers 200 again")
                continue
            failures += 1
            log.warning("health_failed instance=%s failures=%d/%d detail=%s", self.name,
                        failures, cfg.failures, result.detail)
            if failures >= cfg.failures:
                return Outcome.HANG, (f"hang: {failures} health probes failed in a row "
                                      f"(last: {result.detail})")
            if self.state is State.RUNNING:
                self._set_state(State.UNHEALTHY, f"health probe failed: {result.detail}")

    async def _until_ready(self) -> None:
        """Probe until 200: right after each output line (llama-server logs when it is ready),
        else with gaps growing from 10 ms to 250 ms, so readiness is seen within one probe."""
        host, port = self._probe_address()
        cfg = self.config.health
        gap = FIRST_PROBE_S
        while True:
            self._line.clear()
            result = await probe(host, port, cfg.path, cfg.timeout_s)
            if result.ok:
                return
            if result.status is not None:
                self.reason = f"loading ({result.detail})"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(gap):
                    await self._line.wait()
            gap = min(gap * 1.5, MAX_START_PROBE_GAP_S)

    def _probe_address(self) -> tuple[str, int]:
        host = self.config.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return host, self.config.port

    # ---- bookkeeping -------------------------------------------------------------------------

    def _take_line(self, line: str) -> None:
        self.lines.append(line)
        self._line.set()
        self._on_line(self, line)

    def _set_state(self, new: State, reason: str) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        self.reason = reason
        self.since = time.time()
        if new not in ALIVE:
            self._running_since = None
        log.info("state_changed instance=%s old=%s new=%s reason=%s", self.name, old, new, reason)
        self._notify()

    def _notify(self) -> None:
        self._on_change(self)
        self._changed.set()
        self._changed = asyncio.Event()
