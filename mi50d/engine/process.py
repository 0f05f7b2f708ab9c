"""Launching one child process: the only place that forks.

`spawn(spec)` is an async context manager yielding a `Child` (pid, exit wait, signals, output
lines). Leaving the context always ends the child: SIGTERM to its process group, wait, SIGKILL,
reap. The child gets its own session (so signals reach the whole group), a parent-death signal
(so `kill -9` of mi50d takes it down too), and, when the daemon is root, the configured account's
uid, gid and supplementary groups.

Today children are direct children. Running an instance as its own systemd unit later would be a
second implementation of this same small interface (pid, wait, signal, lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mi50d.host.accounts import Account

PR_SET_PDEATHSIG = 1
MAX_LINE = 1 << 20


@dataclass(frozen=True)
class SpawnSpec:
    argv: Sequence[str]
    env: Mapping[str, str]
    account: Account | None = None
    cwd: str = "/"
    on_line: Callable[[str], None] | None = field(default=None, compare=False)


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

    def __init__(self, proc: asyncio.subprocess.Process, on_line: Callable[[str], None] | None):
        self._proc = proc
        self._on_line = on_line
        self.pid = proc.pid
        self.returncode: int | None = None

    async def pump_output(self) -> None:
        """Forward output lines until EOF (the child and every holder of its stdout ended)."""
        stream = self._proc.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than MAX_LINE: take what is buffered
                raw = await stream.read(MAX_LINE)
            if not raw:
                return
            if self._on_line is not None:
                self._on_line(raw.decode("utf-8", "replace").rstrip("\r\n"))

    async def wait(self) -> int:
        self.returncode = await self._proc.wait()
        return self.returncode

    def signal_group(self, sig: int) -> None:
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def terminate(self, timeout_s: float) -> int:
        """SIGTERM the group, wait up to `timeout_s`, then SIGKILL; return the exit status."""
        if self.returncode is None:
            self.signal_group(signal.SIGTERM)
            self.signal_group(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            try:
                async with asyncio.timeout(timeout_s):
                    return await self.wait()
            except TimeoutError:
                pass
        return await self.kill()

    async def kill(self) -> int:
        self.signal_group(signal.SIGKILL)
        return await asyncio.shield(self.wait())


@contextlib.asynccontextmanager
async def spawn(spec: SpawnSpec, stop_timeout_s: float = 10.0) -> AsyncIterator[Child]:
    """Start `spec.argv`; on leaving, make sure the child and its group are gone and reaped."""
    proc = await asyncio.create_subprocess_exec(
        *spec.argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(spec.env),
        cwd=spec.cwd,
        start_new_session=True,
        preexec_fn=_child_setup(spec.account, os.getpid()),
        limit=MAX_LINE,
    )
    child = Child(proc, spec.on_line)
    try:
        yield child
    finally:
        await _to_completion(child.terminate(stop_timeout_s))


async def _to_completion(coro: Coroutine[Any, Any, int]) -> None:
    """Await `coro` to its end even if we are cancelled meanwhile; then re-raise the cancel."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
