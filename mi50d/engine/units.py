"""The second implementation of the spawn interface: each instance as a transient systemd unit.

`UnitSpawner.spawn(name, spec, stop_timeout_s, hurry)` is an async context manager yielding a
`UnitChild` with the same small interface as `engine.process.Child` (pid, wait, terminate, kill,
pump_output). systemd, not mi50d, is the parent: the unit `mi50d@NAME.service` runs llama-server
as the instance's account, sandboxed, with its output in the journal. So the process outlives
mi50d: a restart of mi50d (or its `kill -9`) adopts it again.

- Start: when `mi50d@NAME.service` already runs with the launch asked for (the digest recorded
  in its Description, see `engine.unitbus`), it is adopted, not started: same pid, its uptime
  counted from its own start, its output read back from the journal. When it runs with another
  launch (the configuration changed while mi50d was down), it is stopped and started anew.
- Exit: a pidfd of the main pid on the event loop (no polling); then the exit status from the
  unit's ExecMain* properties, which the unit keeps for us (`AddRef`/`Ref`) until read, and
  whether a stop or restart job of systemd's ended it (`systemctl stop mi50d@NAME`: the user's
  word, which the restart policy must not undo). systemd writes "Stopping ..." to the journal,
  with the job's type and the unit's invocation id, before it signals the process, so the
  journal answers this after the exit without a race; a D-Bus signal would need a GLib loop.
- Output: the journal (python3-systemd's reader), entries of this unit's invocation, through the
  journal's own wake-up file descriptor on the loop.
- Leaving the context stops the unit (systemd sends SIGTERM to the main process, and after
  `[stop] timeout_s` SIGKILL to the whole cgroup, KillMode=mixed), unless the spawner was
  detached: mi50d is shutting down and leaves its instances running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from mi50d.engine.output import MAX_LINE_BYTES, cut
from mi50d.engine.process import SpawnSpec, unspawnable
from mi50d.engine.unitbus import (
    Manager,
    UnitState,
    launch_digest,
    transient_properties,
    unit_name,
)

log = logging.getLogger("mi50d.engine.units")

SETTLE_STEP_S = 0.02  # reading systemd's view of a start or an exit it is still recording ...
SETTLE_TRIES = 250  # ... bounded (5 s): a job's end needs a GLib main loop to be signalled
CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3
SETTLING = frozenset({"activating", "deactivating", "reloading"})
DRAIN_AFTER_EXIT_S = 0.5  # journald may write the last lines a moment after the exit
REPLAY_LINES = 200  # an adopted instance's earlier output, read back from the journal
# systemd's catalog id of "Stopping UNIT..." (sd-messages.h SD_MESSAGE_UNIT_STOPPING), logged by
# pid 1 when a stop or restart job of the unit begins, with JOB_TYPE and INVOCATION_ID.
UNIT_STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"
STOP_JOBS = ("stop", "restart")
JOB_LOOKUP_TRIES = 10  # journald may be a moment behind pid 1: 10 x 50 ms after the exits a
JOB_LOOKUP_STEP_S = 0.05  # stop's SIGTERM produces (exit 0 or SIGTERM), one look after others


MODE_VAR = "MI50D_INSTANCES"  # "units" or "children" overrides the choice below


def units_wanted(under_systemd: bool) -> bool:
    """Instances as units when mi50d is a systemd service (NOTIFY_SOCKET was set, as for
    sd_notify, and systemd's INVOCATION_ID), runs as root on a systemd host.
    `MI50D_INSTANCES=children` (a drop-in) keeps them direct children, `=units` asks for
    units regardless."""
    mode = os.environ.get(MODE_VAR, "")
    if mode in ("children", "units"):
        return mode == "units"
    return (under_systemd and "INVOCATION_ID" in os.environ and os.geteuid() == 0
            and os.path.isdir("/run/systemd/system"))


class UnitChild:
    """A running unit: its main pid, its exit, its output."""

    def __init__(self, spawner: UnitSpawner, unit: str, state: UnitState, adopted: bool,
                 on_line: Callable[[str], None] | None) -> None:
        self._spawner = spawner
        self.unit = unit
        self.pid = state.main_pid
        self.adopted = adopted
        self.invocation = state.invocation
        # CLOCK_MONOTONIC, as time.monotonic(): an adopted instance keeps its uptime.
        self._started_s = state.started_usec / 1e6
        self.started_monotonic: float | None = self._started_s or None
        self.returncode: int | None = None
        self.ended_by: str | None = None  # "stop" or "restart": a job of systemd ended it
        self._stopped_by_us = False  # mi50d's own stop job is no news
        self._on_line = on_line
        self._exited = asyncio.Event()
        self._status: asyncio.Future[int] | None = None
        self._pidfd: int | None = None
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:  # already gone
            self._exited.set()
        else:
            loop.add_reader(self._pidfd, self._exited.set)

    def close(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def wait(self) -> int:
        """The main process's exit status (negative: the signal), as systemd recorded it."""
        await self._exited.wait()
        if self._status is None:
            self._status = asyncio.ensure_future(asyncio.to_thread(self._ended))
        code = await asyncio.shield(self._status)
        self.returncode = code
        return code

    def _ended(self) -> int:
        """Blocking: the exit status, and which job of systemd (if any) ended this run."""
        code = self._spawner.exit_status(self.unit, self.pid, self.invocation)
        if not self._stopped_by_us:  # a stop's SIGTERM usually ends it; its SIGKILL may
            tries = JOB_LOOKUP_TRIES if code in (0, -signal.SIGTERM) else 1
            self.ended_by = stop_job_of(self.unit, self.invocation, tries)
            if self.ended_by == "stop" and self._spawner.starts_again(self.unit, self.invocation):
                self.ended_by = "restart"  # `systemctl restart` logs its stop half as a stop
        return code

    def signal_group(self, sig: int) -> None:
        """Every process of the unit (its cgroup); asynchronous, best effort."""
        self._spawner.send(self.unit, sig)

    async def terminate(self, timeout_s: float, hurry: asyncio.Event | None = None) -> int:
        """Stop the unit: SIGTERM, then after `timeout_s` systemd's SIGKILL to the cgroup (at once
        once `hurry` is set). Detached (mi50d shutting down): leave it running."""
        if self._spawner.detached:
            log.info("instance_left_running unit=%s pid=%d", self.unit, self.pid)
            return 0
        self._stopped_by_us = True
        await asyncio.to_thread(self._spawner.manager().stop, self.unit)
        if hurry is not None:
            waits = {asyncio.ensure_future(self._exited.wait()),
                     asyncio.ensure_future(hurry.wait())}
            try:
                await asyncio.wait(waits, timeout=timeout_s + 5.0,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if not self._exited.is_set():
                return await self.kill()
        return await self.wait()

    async def kill(self) -> int:
        if self._spawner.detached:
            return 0
        await asyncio.to_thread(self._spawner.manager().kill, self.unit, signal.SIGKILL)
        return await self.wait()

    async def pump_output(self) -> None:
        """Forward this run's journal lines (an adopted one: its last REPLAY_LINES first) until
        the process has exited and the journal had a moment to take its last lines."""
        try:
            await self._pump()
        except Exception:  # logged: an instance without output lines must not go unnoticed
            log.exception("instance_journal_failed unit=%s", self.unit)
            raise

    async def _pump(self) -> None:
        from systemd import journal  # python3-systemd, from the distribution

        reader = journal.Reader()
        # This run's entries, by its invocation id (no this_boot(): reading the boot id fails
        # under mi50d.service's ProtectKernelTunables= in a container, and then nothing matches).
        reader.add_match(_SYSTEMD_UNIT=self.unit, _SYSTEMD_INVOCATION_ID=self.invocation)
        if self.adopted:  # what it printed before: the last lines, not hours of them again
            reader.seek_tail()
            self._emit(reader.get_previous(REPLAY_LINES))
        else:
            reader.seek_head()
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        fd = reader.fileno()
        loop.add_reader(fd, wake.set)
        try:
            while True:
                self._drain(reader)
                if self._exited.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DRAIN_AFTER_EXIT_S):
                            await wake.wait()
                    self._drain(reader)
                    return
                await _first(wake.wait(), self._exited.wait())
                wake.clear()
        finally:
            loop.remove_reader(fd)
            reader.close()

    def _drain(self, reader: Any) -> None:
        reader.process()  # acknowledge the wake-up
        while True:
            entry = reader.get_next()
            if not entry:
                return
            self._emit(entry)

    def _emit(self, entry: dict[str, Any]) -> None:
        message = entry.get("MESSAGE")
        if message is None or self._on_line is None:
            return
        raw = message.encode("utf-8", "surrogateescape") if isinstance(message, str) \
            else bytes(message)
        self._on_line(cut(raw[:MAX_LINE_BYTES], max(len(raw) - MAX_LINE_BYTES, 0)))


def stop_job_of(unit: str, invocation: str, tries: int = JOB_LOOKUP_TRIES) -> str | None:
    """Blocking: "stop" or "restart" when systemd began such a job of this run of `unit` (its
    "Stopping" entry, written by pid 1, for this invocation), else None."""
    from systemd import journal

    reader = journal.Reader()
    try:
        reader.add_match(MESSAGE_ID=UNIT_STOPPING, UNIT=unit, _PID="1")
        for attempt in range(tries):
            if attempt:
                time.sleep(JOB_LOOKUP_STEP_S)
            reader.seek_tail()
            for entry in iter(reader.get_previous, {}):
                if _hex(entry.get("INVOCATION_ID")) != invocation:
                    continue
                job = str(entry.get("JOB_TYPE", ""))
                return job if job in STOP_JOBS else None
        return None
    finally:
        reader.close()


def _hex(value: object) -> str:
    """An id as the journal gives it (a UUID for some fields, text for others) in hex."""
    if isinstance(value, uuid.UUID):
        return value.hex
    return str(value or "").replace("-", "").lower()


async def _first(*waits: Any) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class UnitSpawner:
    """Starts, adopts and stops `mi50d@NAME.service` units; one D-Bus connection for all."""

    def __init__(self, address: str | None = None) -> None:
        self._address = address
        self._manager: Manager | None = None
        self.detached = False

    def manager(self) -> Manager:
        if self._manager is None:
            self._manager = Manager(self._address)
        return self._manager

    def detach(self) -> None:
        """From now on leaving a spawn context (or a stop) leaves the unit running."""
        self.detached = True

    def send(self, unit: str, sig: int) -> None:
        with contextlib.suppress(Exception):
            self.manager().kill(unit, sig)

    def starts_again(self, unit: str, invocation: str) -> bool:
        """Blocking, bounded: after a stop job, does systemd start the unit again (the start half
        of `systemctl restart`: a start job on it, or a new run already)?"""
        manager = self.manager()
        for _ in range(SETTLE_TRIES):
            state = manager.state(unit)
            if state is None:
                return False
            if state.invocation != invocation or state.job in ("start", "restart"):
                return True
            if state.active in ("inactive", "failed") and not state.job:
                return False
            time.sleep(SETTLE_STEP_S)
        return False

    def exit_status(self, unit: str, pid: int, invocation: str) -> int:
        """Blocking: the main process's status once systemd has recorded this pid's exit (0 when
        the unit already runs again, `systemctl restart`: the old run's status is gone)."""
        manager = self.manager()
        try:
            for _ in range(SETTLE_TRIES):
                state = manager.state(unit)
                if state is None or state.invocation != invocation:
                    return 0  # collected already, or a new run: nothing more to know
                if state.main_pid != pid and state.exited_usec:
                    return _returncode(state)
                time.sleep(SETTLE_STEP_S)
            log.warning("unit_exit_unrecorded unit=%s pid=%d", unit, pid)
            return -signal.SIGKILL
        finally:
            with contextlib.suppress(Exception):
                manager.unref(unit)

    @contextlib.asynccontextmanager
    async def spawn(self, name: str, spec: SpawnSpec, stop_timeout_s: float = 10.0,
                    hurry: asyncio.Event | None = None) -> AsyncIterator[UnitChild]:
        """Adopt or start `mi50d@name.service` for `spec`; on leaving, stop it (not detached).
        Raises ValueError for a launch systemd refuses, OSError when it cannot execute it."""
        problem = unspawnable(spec)
        if problem is not None:
            raise ValueError(problem)
        unit = unit_name(name)
        digest = launch_digest(spec.argv, spec.env, spec.account, spec.allow)
        state, adopted = await asyncio.to_thread(self._adopt_or_start, name, unit, digest, spec,
                                                 stop_timeout_s)
        child = UnitChild(self, unit, state, adopted, spec.on_line)
        try:
            yield child
        finally:
            try:
                if self.detached:
                    pass  # mi50d is shutting down: the unit keeps running, to be adopted
                elif not child._exited.is_set():
                    await _to_completion(child.terminate(stop_timeout_s, hurry))
                else:
                    await asyncio.shield(child.wait())
            finally:
                child.close()

    def _adopt_or_start(self, name: str, unit: str, digest: str, spec: SpawnSpec,
                        stop_timeout_s: float) -> tuple[UnitState, bool]:
        """Blocking (a worker thread): the running unit when its launch is `digest`, else a new
        one (a different one that runs is stopped first)."""
        m = self.manager()
        state = m.state(unit)
        for _ in range(SETTLE_TRIES):  # a start or stop in flight (`systemctl restart`): its end
            if state is None or state.active not in SETTLING:
                break
            time.sleep(SETTLE_STEP_S)
            state = m.state(unit)
        if state is not None and state.active == "active" and state.main_pid:
            if state.digest == digest:
                m.ref(unit)
                log.info("instance_adopted unit=%s pid=%d", unit, state.main_pid)
                return state, True
            log.info("instance_unit_changed unit=%s pid=%d: stopping it to start the new launch",
                     unit, state.main_pid)
            m.stop(unit)
        if state is not None:
            self._settle_gone(unit, stop_timeout_s + 10.0)
        argv = list(spec.argv)
        try:
            m.start(unit, transient_properties(name, digest, argv, spec.env, spec.account,
                                               spec.cwd, stop_timeout_s, spec.allow,
                                               spec.writable, spec.guard))
        except Exception as exc:
            raise ValueError(f"systemd refused unit {unit}: {_dbus_message(exc)}") from None
        for _ in range(SETTLE_TRIES):
            state = m.state(unit)
            if state is not None and state.main_pid and state.active in ("active", "activating"):
                return state, False
            if state is not None and state.active == "failed":
                m.reset_failed(unit)
                raise OSError(errno.ENOEXEC, f"systemd could not start it ({state.result}); "
                              f"journalctl -u {unit}")
            time.sleep(SETTLE_STEP_S)
        raise OSError(errno.ETIMEDOUT, f"{unit} did not start; journalctl -u {unit}")

    def _settle_gone(self, unit: str, timeout_s: float) -> None:
        """Wait (bounded) until a stopped or dead unit is gone, its failed state reset."""
        m = self.manager()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = m.state(unit)
            if state is None:
                return
            if state.active in ("inactive", "failed"):
                m.reset_failed(unit)
                with contextlib.suppress(Exception):
                    m.unref(unit)
            time.sleep(SETTLE_STEP_S * 5)


def _returncode(state: UnitState) -> int:
    if state.exit_code in (CLD_KILLED, CLD_DUMPED):
        return -state.exit_status
    return state.exit_status


def _dbus_message(exc: Exception) -> str:
    text = str(exc)
    return text.split(": ", 1)[-1] if "GDBus.Error" in text else text


async def _to_completion(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
