"""One small handler per control command, in the explicit `HANDLERS` dict. Each docstring is that
command's wire format (requests and frames are defined in `mi50d.control.protocol`).

A handler gets the daemon, its validated args and `emit` (sends one event frame), and returns the
result model. It raises `UnknownInstance` or `ConfigError`; `mi50d.control.server` turns those into error
frames, and anything else into `internal` (logged with its traceback, never sent).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mi50d import __version__
from mi50d.config import HostPaths
from mi50d.control import checks
from mi50d.control.protocol import (
    DaemonInfo,
    GpuStatus,
    InstancesResult,
    InstanceStatus,
    LogsArgs,
    LogsChunk,
    LogsResult,
    ReloadArgs,
    ReloadResult,
    RestartArgs,
    StartArgs,
    StartProgress,
    StartResult,
    StatusArgs,
    StatusResult,
    StopArgs,
)
from mi50d.control.view import DaemonView
from mi50d.engine.desired import Reply, Verdict
from mi50d.engine.events import Event, Subscription
from mi50d.engine.supervisor import Supervisor, UnknownInstance
from mi50d.host.gpus import list_gpus

log = logging.getLogger("mi50d.control.handlers")

Emit = Callable[[BaseModel], Awaitable[None]]

# `start` progress: at most one frame per PROGRESS_GAP_S for output lines (llama-server prints
# hundreds while loading), and one at least every HEARTBEAT_S so elapsed time moves on screen.
PROGRESS_GAP_S = 0.2
HEARTBEAT_S = 1.0
# `logs --follow`: lines are sent in chunks of what queued up meanwhile, up to this many lines
# and about this many characters, so one frame stays small whatever the lines are.
CHUNK_LINES = 500
CHUNK_BYTES = 256 * 1024


async def status(daemon: DaemonView, args: StatusArgs, emit: Emit) -> StatusResult:
    """`status {name?: str}` -> result `StatusResult {daemon: DaemonInfo, instances: [InstanceStatus]}`.

    Without `name`, every instance sorted by name. Errors: unknown_instance.
    """
    gw = daemon.gateway
    info = DaemonInfo(version=__version__, pid=os.getpid(), config_dir=str(daemon.config_dir),
                      socket=str(daemon.socket_path),
                      uptime_s=round(time.monotonic() - daemon.started, 3),
                      gateway=gw.url if gw else None)
    instances = [s.model_copy(update={
        "on_demand": daemon.supervisor.get(s.name).config.on_demand,
        "in_flight": gw.in_flight(s.name) if gw else 0,
        "last_used": gw.last_used(s.name) if gw else None}) for s in
        daemon.supervisor.status(args.name)]
    gpus = await asyncio.to_thread(gpu_status, daemon.supervisor.config.daemon.host)
    return StatusResult(daemon=info, instances=instances, gpus=gpus)


def gpu_status(host: HostPaths) -> list[GpuStatus]:
    """Telemetry of every GPU in the KFD topology, read from sysfs (a worker thread's job)."""
    return [GpuStatus(index=g.index, gfx=g.gfx, card=g.card, pci=g.pci_address,
                      vram_total=g.vram_total, vram_used=g.vram_used, busy_percent=g.busy_percent,
                      temperatures_c=dict(g.temperatures_c), power_w=g.power_w)
            for g in list_gpus(host)]


async def start(daemon: DaemonView, args: StartArgs, emit: Emit) -> StartResult:
    """`start {name: str, wait: bool = true, timeout_s: float? }` -> events `StartProgress
    {name, state, reason, elapsed_s, line?}`, then result `StartResult {outcome, status,
    elapsed_s, superseded?}`.

    Without `wait`: no events, outcome "requested". With it: progress on every state change, on
    output lines (at most every 0.2 s) and every second; the final outcome is "running",
    "failed" (gave up: see status.reason, .diagnosis, .last_lines; or a later stop or a
    reload's removal came first: `superseded` says which) or "timeout" (timeout_s passed; it
    keeps starting). A reload that restarts the instance meanwhile does not end the wait.
    Errors: unknown_instance.
    """
    sup = daemon.supervisor
    began = time.monotonic()
    with sup.events.subscribe(size=256) as sub:
        inst = sup.get(args.name)
        ticket = sup.start(args.name)
        if not args.wait:
            return StartResult(outcome="requested", status=sup.describe(inst))
        deadline = None if args.timeout_s is None else began + args.timeout_s
        answer = asyncio.ensure_future(ticket.wait())
        line: str | None = None
        last_sent = began  # the first progress is the first change, or a heartbeat
        pending = False  # a state change or line not sent yet
        try:
            while True:
                now = time.monotonic()
                if answer.done():
                    reply = answer.result()
                    overtaken = reply.verdict in (Verdict.SUPERSEDED, Verdict.REMOVED)
                    return StartResult(outcome="running" if reply.ok else "failed",
                                       status=sup.describe(inst), elapsed_s=now - began,
                                       superseded=reply.reason if overtaken else None)
                if deadline is not None and now >= deadline:
                    return StartResult(outcome="timeout", status=sup.describe(inst),
                                       elapsed_s=now - began)
                due = last_sent + (PROGRESS_GAP_S if pending else HEARTBEAT_S)
                if now >= due:
                    await emit(_progress(sup.describe(inst), now - began, line))
                    last_sent, pending = now, False
                    due = now + HEARTBEAT_S
                wait_s = due - now if deadline is None else min(due, deadline) - now
                event = await _next_event(sub, answer, max(wait_s, 0.0))
                if event is None or _about(event) != args.name:
                    continue
                pending = True
                if event["event"] == "line":
                    line = str(event["line"])
                else:
                    last_sent = -HEARTBEAT_S  # a state change goes out at once
        finally:
            answer.cancel()


async def _next_event(sub: Subscription, answer: asyncio.Future[Reply],
                      timeout_s: float) -> Event | None:
    """The next event, or None when `answer` came or `timeout_s` passed first."""
    got = asyncio.ensure_future(sub.get())
    waits: set[asyncio.Future[Any]] = {got, answer}
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not got.done():
            got.cancel()
    return got.result() if got.done() and not got.cancelled() else None


def _about(event: Event) -> str | None:
    if event["event"] == "line":
        return str(event["name"])
    if event["event"] == "state":
        return str(event["status"]["name"])
    return None


def _progress(st: InstanceStatus, elapsed_s: float, line: str | None) -> StartProgress:
    return StartProgress(name=st.name, state=st.state, reason=st.reason,
                         elapsed_s=round(elapsed_s, 3), line=line)


async def stop(daemon: DaemonView, args: StopArgs, emit: Emit) -> InstancesResult:
    """`stop {name?: str}` -> result `InstancesResult {instances: [InstanceStatus]}` once no
    process of them is left (each within its own stop timeout; a stop cuts preflight, loading
    and backoff short and wins over any earlier start). Without `name`, every instance, all at
    once. Errors: unknown_instance.
    """
    sup = daemon.supervisor
    names = [sup.get(args.name).name] if args.name else sup.names()
    replies = await asyncio.gather(*(_known(sup.ensure_stopped, n) for n in names))
    _log_unfinished("stop", names, replies)
    return InstancesResult(instances=[s for n in names for s in _status_if_known(sup, n)])


async def restart(daemon: DaemonView, args: RestartArgs, emit: Emit) -> InstancesResult:
    """`restart {name?: str}` -> result `InstancesResult {instances: [InstanceStatus]}` once each
    is stopped and has begun to start again (use `start` with `wait` to follow the start).
    Without `name`, every instance. Errors: unknown_instance.
    """
    sup = daemon.supervisor
    names = [sup.get(args.name).name] if args.name else sup.names()
    replies = await asyncio.gather(*(_known(sup.restart, n) for n in names))
    _log_unfinished("restart", names, replies)
    return InstancesResult(instances=[s for n in names for s in _status_if_known(sup, n)])


async def _known(request: Callable[[str], Awaitable[Reply]], name: str) -> Reply | None:
    """`request(name)`, or None when a reload removed `name` after the names were read (only
    for requests on every instance: a named one reports unknown_instance before this)."""
    try:
        return await request(name)
    except UnknownInstance:
        return None


def _status_if_known(sup: Supervisor, name: str) -> list[InstanceStatus]:
    """`name`'s status, or nothing if a reload removed it meanwhile."""
    try:
        return sup.status(name)
    except UnknownInstance:
        return []


def _log_unfinished(command: str, names: list[str], replies: list[Reply | None]) -> None:
    for name, reply in zip(names, replies, strict=True):
        if reply is not None and not reply.ok:
            log.info("control_request_unfinished command=%s instance=%s verdict=%s reason=%s",
                     command, name, reply.verdict, reply.reason)


async def reload(daemon: DaemonView, args: ReloadArgs, emit: Emit) -> ReloadResult:
    """`reload {}` -> result `ReloadResult {added, removed, restarted, unchanged}` (instance
    names). The same path as SIGHUP. Errors: config_error, with every problem in `details`;
    the running set is then kept as it was.
    """
    report = await daemon.reload()
    return ReloadResult(added=report.added, removed=report.removed, restarted=report.restarted,
                        unchanged=report.unchanged)


async def logs(daemon: DaemonView, args: LogsArgs, emit: Emit) -> LogsResult:
    """`logs {name: str, n: int = 50, follow: bool = false, chunked: bool = false}` -> result
    `LogsResult {name, lines}` (the last n lines kept in memory, which is bounded in bytes: see
    engine.output). With `chunked`: events `LogsChunk {lines}` of at most CHUNK_BYTES each, then
    `LogsResult {name, lines: []}`, so no frame holds the whole backlog. With
    `follow`: events `LogsChunk {lines, dropped}`, the last n lines first (in chunks of at most
    CHUNK_BYTES), then new lines as they come, across restarts of the instance, until the client
    disconnects (no final frame). Errors: unknown_instance.
    """
    sup = daemon.supervisor
    if not args.follow:
        kept = sup.get(args.name).lines.tail(args.n)
        if not args.chunked:
            return LogsResult(name=args.name, lines=kept)
        for chunk in _chunks(kept):
            await emit(LogsChunk(lines=chunk))
        return LogsResult(name=args.name, lines=[])
    # Subscribe and copy the backlog with no await between: no line is lost or sent twice.
    with sup.events.subscribe(size=10_000) as sub:
        kept = sup.get(args.name).lines.tail(args.n)
        chunks = list(_chunks(kept)) or [[]]
        for chunk in chunks:
            await emit(LogsChunk(lines=chunk))
        reported = 0
        while True:
            batch = [await sub.get()]
            size = 0
            while not sub.queue.empty() and len(batch) < CHUNK_LINES and size < CHUNK_BYTES:
                batch.append(sub.take_nowait())
                size += len(str(batch[-1].get("line", "")))
            lines = [str(e["line"]) for e in batch
                     if e["event"] == "line" and e["name"] == args.name]
            if lines or sub.dropped != reported:
                await emit(LogsChunk(lines=lines, dropped=sub.dropped - reported))
                reported = sub.dropped


def _chunks(lines: list[str]) -> Iterator[list[str]]:
    """`lines` in runs of at most CHUNK_LINES lines and about CHUNK_BYTES characters."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        if chunk and (len(chunk) >= CHUNK_LINES or size + len(line) > CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Command:
    run: Callable[[DaemonView, Any, Emit], Coroutine[Any, Any, BaseModel]]
    mutates: bool  # changes what runs: logged with the peer's uid and pid
    streams: bool  # may send events; cancelled when the client disconnects


HANDLERS: dict[str, Command] = {
    "status": Command(status, mutates=False, streams=False),
    "start": Command(start, mutates=True, streams=True),
    "stop": Command(stop, mutates=True, streams=False),
    "restart": Command(restart, mutates=True, streams=False),
    "reload": Command(reload, mutates=True, streams=False),
    "logs": Command(logs, mutates=False, streams=True),
    "check": Command(checks.check, mutates=False, streams=False),
    "doctor": Command(checks.doctor, mutates=False, streams=False),
}
