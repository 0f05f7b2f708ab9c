"""Pieces of one attempt of an instance's owner loop: the hooks into the host checks, preflight
under a deadline that a stop can cut short, the health watch, and bounded calls of host code.

Everything here runs for exactly one instance, inside its own loop (`engine.instance`); nothing
here is shared between instances, so nothing here can stall another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from mi50d.config import DaemonConfig, InstanceConfig
from mi50d.engine.health import HealthResult, probe
from mi50d.engine.states import Outcome, State
from mi50d.host import tcpstate
from mi50d.host.accounts import Account
from mi50d.host.rpchello import HelloError, hello_async

log = logging.getLogger("mi50d.engine.run")

PREFLIGHT_TIMEOUT_S = 30.0  # file checks as the service account, mounts, VRAM estimate
DIAGNOSE_LINE_CHARS = 1024  # host code reads lines cut to this: llama-server's are shorter
READ_LINES_TIMEOUT_S = 5.0  # a diagnosis or buffer reading that takes longer is dropped
FIRST_PROBE_S = 0.01
MAX_START_PROBE_GAP_S = 0.25

T = TypeVar("T")
# A job for a worker thread: None when every check passed, else one line: cause and fix.
Job = Callable[[], str | None]
# A reading of the last output lines after a failure: (one-line diagnosis, fatal) or None.
Diagnose = Callable[[Sequence[str]], tuple[str, bool] | None]
Degraded = Callable[[Sequence[str]], str | None]


@dataclass(frozen=True)
class Ended:
    """How one run ended (None from an attempt means: a request interrupted it)."""

    outcome: Outcome
    detail: str
    healthy_for_s: float = 0.0


@dataclass(frozen=True)
class Hooks:
    """What the engine asks of the host checks, built per attempt from the configuration then in
    place (so a reload that changes only daemon settings applies to the next start)."""

    preflight: Callable[[InstanceConfig, DaemonConfig, Account | None], Job] | None = None
    diagnose: Callable[[InstanceConfig], Diagnose] | None = None
    degraded: Callable[[InstanceConfig], Degraded] | None = None
    buffers: Callable[[InstanceConfig], Callable[[Sequence[str]], dict[int, int]]] | None = None
    observe: Callable[[str, str, float], None] | None = None  # metrics: (instance, event, seconds)
    # How to launch: None is `engine.process.spawn` (direct children); under systemd,
    # `engine.units.UnitSpawner.spawn` (name, spec, stop timeout, hurry -> async context manager).
    spawn: Callable[..., Any] | None = None

    def preflight_job(self, config: InstanceConfig, daemon: DaemonConfig,
                      account: Account | None) -> Job | None:
        if self.preflight is None or not daemon.preflight:
            return None
        return self.preflight(config, daemon, account)

    def diagnose_of(self, config: InstanceConfig) -> Diagnose | None:
        return None if self.diagnose is None else self.diagnose(config)

    def degraded_of(self, config: InstanceConfig) -> Degraded | None:
        return None if self.degraded is None else self.degraded(config)

    def buffers_of(self, config: InstanceConfig) -> Callable[[Sequence[str]], dict[int, int]] | None:
        return None if self.buffers is None else self.buffers(config)

    def observed(self, name: str, event: str, seconds: float) -> None:
        if self.observe is not None:
            self.observe(name, event, seconds)


class Watched(Protocol):
    """What the health watch needs of its instance (`engine.instance.Instance`)."""

    config: InstanceConfig
    hooks: Hooks
    state: State
    reason: str
    diagnosis: str | None
    logged_vram: dict[int, int]
    pid: int | None

    @property
    def name(self) -> str: ...

    @property
    def lines(self) -> Iterable[str]: ...

    def set_state(self, new: State, reason: str) -> None: ...

    def mark_ready(self, how: str) -> None: ...

    def line_event(self) -> asyncio.Event: ...


@dataclass
class Preflight:
    """Runs one instance's preflight jobs in a thread each, under a deadline that a stop cuts
    short.

    A job cannot be cancelled (a FIFO as the model blocks `open` for good), so one cut short is
    left to finish on its own and its answer is ignored. The next attempt first waits (within its
    own deadline) for that one to end, so an instance never has more than one preflight thread.
    """

    name: str
    timeout_s: float = PREFLIGHT_TIMEOUT_S
    _last: asyncio.Future[str | None] | None = field(default=None, repr=False)

    async def run(self, job: Job, interrupt: asyncio.Event) -> str | None:
        """The job's answer; or a line saying it did not finish; or None when `interrupt` was
        set first (the caller checks that)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        if self._last is not None and not self._last.done():
            await _within(self._last, interrupt, deadline)
            if not self._last.done():
                return None if interrupt.is_set() else self._blocked()
        answer: asyncio.Future[str | None] = loop.create_future()

        def work() -> None:
            try:
                value = job()
            except Exception as exc:  # a check's bug or an input it did not expect
                log.exception("preflight_crashed instance=%s", self.name)
                value = f"a preflight check crashed ({one_line(exc)}); see the journal"
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, answer, value)

        self._last = answer
        threading.Thread(target=work, name=f"preflight:{self.name}", daemon=True).start()
        await _within(answer, interrupt, deadline)
        if answer.done():
            return answer.result()
        return None if interrupt.is_set() else self._blocked()

    def _blocked(self) -> str:
        return (f"preflight did not finish within {self.timeout_s:g}s (a file that blocks on "
                "open, such as a FIFO, or a hung mount?)")


async def _within(future: asyncio.Future[Any], interrupt: asyncio.Event, deadline: float) -> None:
    """Wait for `future` until `interrupt` is set or `deadline` (loop time); never cancels it."""
    stopped: asyncio.Future[Any] = asyncio.ensure_future(interrupt.wait())
    try:
        timeout = max(deadline - asyncio.get_running_loop().time(), 0.0)
        await asyncio.wait({future, stopped}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        await asyncio.gather(stopped, return_exceptions=True)


def _settle(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def short(lines: Sequence[str]) -> tuple[str, ...]:
    """Lines as host code reads them: each cut to DIAGNOSE_LINE_CHARS."""
    return tuple(line[:DIAGNOSE_LINE_CHARS] for line in lines)


async def bounded(fn: Callable[[tuple[str, ...]], T], lines: Sequence[str],
                  timeout_s: float) -> T | None:
    """`fn(short(lines))` in a worker thread: None if it raises or outlasts `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.to_thread(fn, short(lines))
    except TimeoutError:
        log.warning("host_reading_timed_out fn=%s timeout_s=%g", getattr(fn, "__name__", fn),
                    timeout_s)
    except Exception:
        log.exception("host_reading_failed")
    return None


async def first_of(*waits: Awaitable[Any]) -> None:
    """Wait until one of `waits` completes; cancel the others."""
    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def probe_address(config: InstanceConfig) -> tuple[str, int]:
    host = config.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, config.port


SERVING = "Accepted client connection"  # an RPC worker's line; it then answers only that client
SERVED = "Client connection closed"


async def probe_of(inst: Watched) -> HealthResult:
    """One probe: llama-server's health path over HTTP; an rpc-worker's hello.

    An RPC worker serves one client at a time from a backlog of one: while llama-server is its
    client (its last connection line is SERVING) a probe's connection would wait, or overflow
    the backlog. Then the worker is healthy while it listens on its port (the kernel's socket
    table says so without connecting), and llama-server has lost it once its connection to the
    worker is closed from the worker's side (`host.tcpstate`)."""
    host, port = probe_address(inst.config)
    cfg = inst.config.health
    if not inst.config.is_worker:
        result = await probe(host, port, cfg.path, cfg.timeout_s)
        if result.ok and inst.config.rpc and inst.pid is not None:
            lost = await asyncio.to_thread(_lost_workers, inst.pid, inst.config.rpc)
            if lost:
                return HealthResult(False, None, f"RPC worker {lost[0]} unreachable (it closed "
                                    "its connection to llama-server: it died or restarted)")
        return result
    if _serving(inst.lines):
        if await asyncio.to_thread(tcpstate.listening, port):
            return HealthResult(True, None, "serving a client; listening")
        return HealthResult(False, None, f"serving a client but no longer listening on {port}")
    try:
        version = await hello_async(host, port, cfg.timeout_s)
    except HelloError as exc:
        return HealthResult(False, None, str(exc))
    return HealthResult(True, 200, f"RPC protocol {version}")


def _lost_workers(pid: int, endpoints: Sequence[str]) -> list[str]:
    return tcpstate.lost_workers(pid, {e: tcpstate.resolve(e) for e in endpoints})


def _serving(lines: Iterable[str]) -> bool:
    last = None
    for line in lines:
        if line.startswith((SERVING, SERVED)):
            last = line
    return last is not None and last.startswith(SERVING)


async def health_watch(inst: Watched) -> tuple[Outcome, str]:
    """Wait for the first 200, then watch; return only on a hang or a start timeout."""
    cfg = inst.config.health
    clock = asyncio.get_running_loop().time
    spawned = clock()  # the watch starts with the process
    try:
        async with asyncio.timeout(cfg.start_timeout_s):
            await _until_ready(inst)
    except TimeoutError:
        return Outcome.START_FAILED, f"not ready within start_timeout_s={cfg.start_timeout_s:g}"
    inst.hooks.observed(inst.name, "start", clock() - spawned)
    # What it logged while loading is read once, in a worker thread, from lines cut short.
    lines = tuple(inst.lines)
    degraded = inst.hooks.degraded_of(inst.config)
    if degraded is not None:
        inst.diagnosis = await bounded(degraded, lines, READ_LINES_TIMEOUT_S)
    buffers = inst.hooks.buffers_of(inst.config)
    if buffers is not None:
        inst.logged_vram = await bounded(buffers, lines, READ_LINES_TIMEOUT_S) or {}
    inst.mark_ready("answered the RPC hello" if inst.config.is_worker
                    else f"{cfg.path} answered 200")
    failures = 0
    # Probes keep a fixed schedule (a slow, timed-out probe does not push the next one back),
    # so a hang is caught within interval_s * failures + timeout_s.
    due = clock()
    while True:
        due = max(due + cfg.interval_s, clock())
        await asyncio.sleep(due - clock())
        result = await probe_of(inst)
        inst.hooks.observed(inst.name, "health_probe", clock() - due)  # it began when due
        if result.ok:
            if failures:
                log.info("health_recovered instance=%s", inst.name)
            failures = 0
            if inst.state is State.UNHEALTHY:
                inst.set_state(State.RUNNING, f"healthy again ({result.detail})")
            continue
        failures += 1
        log.warning("health_failed instance=%s failures=%d/%d detail=%s", inst.name,
                    failures, cfg.failures, result.detail)
        if failures >= cfg.failures:
            return Outcome.HANG, (f"hang: {failures} health probes failed in a row "
                                  f"(last: {result.detail})")
        if inst.state is State.RUNNING:
            inst.set_state(State.UNHEALTHY, f"health probe failed: {result.detail}")


async def _until_ready(inst: Watched) -> None:
    """Probe until 200: right after each output line (llama-server logs when it is ready), else
    with gaps growing from 10 ms to 250 ms, so readiness is seen within one probe."""
    line = inst.line_event()
    gap = FIRST_PROBE_S
    while True:
        line.clear()
        result = await probe_of(inst)
        if result.ok:
            return
        if result.status is not None:
            inst.reason = f"loading ({result.detail})"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(gap):
                await line.wait()
        gap = min(gap * 1.5, MAX_START_PROBE_GAP_S)
