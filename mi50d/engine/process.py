"""Launching one child process: the only place that forks.

`spawn(spec)` is an async context manager yielding a `Child` (pid, exit wait, signals, output
lines). Leaving the context always ends the whole process group, not only the leader: SIGTERM to
the group, wait for every member (the leader reaped, the others through pidfds), SIGKILL what is
left, also when the leader already exited and left a child of its own behind. The child gets
its own session (so signals reach the whole group), a parent-death signal (so `kill -9` of mi50d
takes the leader down too; its own children only through the group, on a stop), and, when the
daemon is root, the configured account's uid, gid and supplementary groups.

Today children are direct children. Running an instance as its own systemd unit later would be a
second implementation of this same small interface (pid, wait, signal, lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mi50d.engine.output import MAX_LINE_BYTES, cut
from mi50d.host.accounts import Account

PR_SET_PDEATHSIG = 1
READ_BYTES = 64 * 1024
GONE_S = 5.0  # after SIGKILL, how long to wait for the group's other processes to end


@dataclass(frozen=True)
class SpawnSpec:
    argv: Sequence[str]
    env: Mapping[str, str]
    account: Account | None = None
    cwd: str = "/"
    on_line: Callable[[str], None] | None = field(default=None, compare=False)
    # Under systemd only: the client networks a unit may talk to (IPAddressAllow=, with
    # IPAddressDeny=any; empty: no restriction), and directories it may write.
    allow: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    # Under systemd only: argv run as root before the start and after the stop (an rpc-worker's
    # nftables table, which enforces allow where cgroup BPF cannot).
    guard: tuple[tuple[str, ...], tuple[str, ...]] | None = None


def _child_setup(account: Account | None, parent: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        # Runs in the forked child before exec. First the account: the kernel clears the
        # parent-death signal whenever the effective uid or gid changes, so it comes after.
        if account is not None:
            os.setgroups(list(account.groups))
            os.setgid(account.gid)
            os.setuid(account.uid)
        # Die with the daemon, whatever kills it (kill -9 included).
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the daemon died between fork and prctl
            os._exit(1)

    return setup


def unspawnable(spec: SpawnSpec) -> str | None:
    """Why exec cannot carry `spec` unchanged (asyncio raises, uvloop silently cuts), or None."""
    for i, arg in enumerate(spec.argv):
        if "\0" in arg:
            return f"argument {i} ({arg.split(chr(0))[0][:40]!r}...) contains an embedded null byte"
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key:
            return f"environment variable name {key[:40]!r} is empty or contains '=' or NUL"
        if "\0" in value:
            return f"environment variable {key[:40]} contains an embedded null byte"
    return None


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        return f"signal {-returncode} ({name})"
    return f"exit {returncode}"


class Child:
    """A running child: its pid, its exit, its process group, its output."""

    def __init__(self, proc: asyncio.subprocess.Process, exited: asyncio.Event,
                 on_line: Callable[[str], None] | None):
        self._proc = proc
        self._exited = exited
        self._on_line = on_line
        self.pid = proc.pid  # also the process group's id (a session of its own)
        self.returncode: int | None = None
        self.ended_by: str | None = None  # a direct child has no systemd job to end it

    async def pump_output(self) -> None:
        """Forward output lines until EOF (the child and every holder of its stdout ended).
        Memory stays bounded whatever comes: each line keeps its first MAX_LINE_BYTES, and the
        rest of it is counted, not stored."""
        stream = self._proc.stdout
        assert stream is not None
        head = bytearray()
        skipped = 0
        while True:
            chunk = await stream.read(READ_BYTES)
            if not chunk:
                if head or skipped:
                    self._emit(bytes(head), skipped)
                return
            *ended, rest = chunk.split(b"\n")
            for part in ended:
                room = MAX_LINE_BYTES - len(head)
                self._emit(bytes(head) + part[:max(room, 0)], skipped + max(len(part) - room, 0))
                head.clear()
                skipped = 0
            room = MAX_LINE_BYTES - len(head)
            head += rest[:max(room, 0)]
            skipped += max(len(rest) - room, 0)

    def _emit(self, raw: bytes, skipped: int) -> None:
        if self._on_line is not None:
            self._on_line(cut(raw, skipped))

    async def wait(self) -> int:
        """The leader's exit status, as soon as it is reaped. Not `Process.wait()`: that also
        waits for the output pipe to close, which a child the leader left behind holds open."""
        await self._exited.wait()
        code = self._proc.returncode
        assert code is not None, "process_exited comes after the reap"
        self.returncode = code
        return code

    def signal_group(self, sig: int) -> None:
        """Signal every process of the group, the leader gone or not: a child it left behind
        keeps the group (and its id) alive."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def terminate(self, timeout_s: float, hurry: asyncio.Event | None = None) -> int:
        """SIGTERM the group; wait up to `timeout_s` (less once `hurry` is set) for every process
        of it to end; then SIGKILL what is left. Returns the leader's exit status."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        others = await asyncio.to_thread(group_members, self.pid, self.pid)
        if self.returncode is None or others:
            self.signal_group(signal.SIGTERM)
            self.signal_group(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            await _first(_all_ended(self.wait(), others), deadline, hurry)
        return await self.kill()

    async def kill(self) -> int:
        """SIGKILL the group, reap the leader, and wait (bounded) for the rest of it to end."""
        self.signal_group(signal.SIGKILL)
        status = await asyncio.shield(self.wait())
        others = await asyncio.to_thread(group_members, self.pid, self.pid)
        if others:
            self.signal_group(signal.SIGKILL)
            loop = asyncio.get_running_loop()
            await _first(_ended(others), loop.time() + GONE_S, None)
        return status


def group_members(pgid: int, leader: int | None = None) -> list[int]:
    """Living pids in process group `pgid` (but `leader`), read from /proc: a worker thread's
    job. Zombies are left out: they hold no port, memory or GPU, and are not ours to reap."""
    found: list[int] = []
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == leader:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rpartition(b")")[2].split()  # state, ppid, pgrp, ...
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            found.append(int(entry.name))
    return found


async def _first(work: Awaitable[object], deadline: float, hurry: asyncio.Event | None) -> None:
    """Await `work` until `deadline` (loop time) or until `hurry` is set, whichever is first."""
    task = asyncio.ensure_future(work)
    waits: set[asyncio.Future[Any]] = {task}
    hurried = None
    if hurry is not None:
        hurried = asyncio.ensure_future(hurry.wait())
        waits.add(hurried)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait(waits, timeout=max(deadline - loop.time(), 0),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in waits:
            t.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def _all_ended(leader: Awaitable[int], others: list[int]) -> None:
    await asyncio.gather(leader, _ended(others))


async def _ended(pids: list[int]) -> None:
    """Wait until every one of `pids` has exited (pidfds, not polling); unknown pids count as
    ended. They are not our children, so there is nothing to reap."""
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    try:
        waits = []
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # gone already
                continue
            fds.append(fd)
            ended: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _settle, ended)
            waits.append(ended)
        await asyncio.gather(*waits)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@contextlib.asynccontextmanager
async def spawn(spec: SpawnSpec, stop_timeout_s: float = 10.0,
                hurry: asyncio.Event | None = None) -> AsyncIterator[Child]:
    """Start `spec.argv`; on leaving, make sure every process of its group is gone and the
    leader reaped (`hurry` set: without waiting out the stop timeout). Raises ValueError for
    a command line or environment that exec cannot carry (both event loops alike)."""
    problem = unspawnable(spec)
    if problem is not None:
        raise ValueError(problem)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _Protocol(READ_BYTES, loop),
        *spec.argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(spec.env),
        cwd=spec.cwd,
        start_new_session=True,
        preexec_fn=_child_setup(spec.account, os.getpid()),
    )
    child = Child(asyncio.subprocess.Process(transport, protocol, loop), protocol.exited,
                  spec.on_line)
    try:
        yield child
    finally:
        try:
            await _to_completion(child.terminate(stop_timeout_s, hurry))
        finally:
            transport.close()  # our end of the pipe, even if an escaped process holds the other


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's own protocol, plus an event set when the leader has exited and been reaped."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


async def _to_completion(coro: Coroutine[Any, Any, int]) -> None:
    """Await `coro` to its end even if we are cancelled meanwhile; then re-raise the cancel."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
