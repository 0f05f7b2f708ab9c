"""Checking and running things *as the account* an instance runs as, not as the daemon.

A root daemon can read a 0600 model that the `mi50d` account cannot; only a check made with that
account's uid, gid and supplementary groups tells the truth. Both helpers start a short child
through subprocess's `user`/`group`/`extra_groups` (the ids are switched in the child before
exec; no fork of the daemon's threads in Python). With `account=None` (an unprivileged daemon,
whose children run as itself) they check in-process / run directly.
This module owns that identity switch for checks; `mi50d.engine.process` owns it for instances.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import selectors
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from mi50d.host.accounts import Account

Mode = Literal["r", "x", "rw"]

# Runs in the child as the account: for each (path, mode), null or the error text.
_CHILD = r"""
import json, os, stat, sys
out = []
for path, mode in json.loads(sys.argv[1]):
    try:
        if mode == "r":
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    out.append("not a regular file")
                    continue
                os.read(fd, 1)
            finally:
                os.close(fd)
            out.append(None)
        else:
            want = os.X_OK if mode == "x" else os.R_OK | os.W_OK
            out.append(None if os.access(path, want) else os.strerror(13))
    except OSError as e:
        out.append(e.strerror or str(e))
print(json.dumps(out))
"""
MAX_OUTPUT = 64 << 10  # of a checked child's output, the first and last halves are kept
_GRACE_S = 1.0  # output still arriving after the child exited (from its children)


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None: could not start, or timed out
    output: str  # stdout and stderr together, or the reason it did not run

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_line(self) -> str:
        lines = [line for line in self.output.splitlines() if line.strip()]
        return lines[-1].strip()[:300] if lines else "no output"


def account_name(account: Account | None) -> str:
    if account is not None:
        return account.name
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def _ids(account: Account | None) -> tuple[int | None, int | None, list[int] | None]:
    if account is None:
        return None, None, None
    return account.uid, account.gid, list(account.groups)


def check_access(account: Account | None, requests: Sequence[tuple[Path, Mode]],
                 timeout_s: float = 20.0) -> list[str | None]:
    """For each (path, mode): None if `account` may do it, else the error ("Permission denied").
    "r" opens and reads a byte; "x" and "rw" use access(2) with the account's real ids."""
    if not requests:
        return []
    if account is None:
        return _check_here(requests)
    # The child repeats _check_here as a self-contained script: it runs isolated (-I -S) as an
    # account that may not be able to read this package.
    payload = json.dumps([[str(p), m] for p, m in requests])
    done = run_as(account, [sys.executable, "-I", "-S", "-c", _CHILD, payload], {}, timeout_s)
    try:  # the last line: stderr (warnings) shares the pipe
        result = json.loads(done.output.strip().splitlines()[-1]) if done.ok else None
    except (ValueError, IndexError):
        result = None
    if not isinstance(result, list) or len(result) != len(requests):
        why = done.last_line() if done.returncode is not None else done.output
        return [f"cannot check as {account.name}: {why[-200:]}"] * len(requests)
    return [r if isinstance(r, str) else None for r in result]


def _check_here(requests: Sequence[tuple[Path, Mode]]) -> list[str | None]:
    out: list[str | None] = []
    for path, mode in requests:
        try:
            if mode == "r":
                # O_NONBLOCK: opening a FIFO for reading would wait for a writer
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    regular = stat.S_ISREG(os.fstat(fd).st_mode)
                    if regular:
                        os.read(fd, 1)
                finally:
                    os.close(fd)
                out.append(None if regular else "not a regular file")
            else:
                want = os.X_OK if mode == "x" else os.R_OK | os.W_OK
                out.append(None if os.access(path, want) else os.strerror(13))
        except OSError as exc:
            out.append(exc.strerror or str(exc))
    return out


def run_as(account: Account | None, argv: Sequence[str], env: Mapping[str, str],
           timeout_s: float) -> RunResult:
    """Run `argv` as `account` with `env`, stdin closed, output captured; never raises, never
    waits past `timeout_s`. The child gets its own process group, killed whole on the deadline
    (a grandchild holding the pipe open would make a plain `subprocess.run` wait forever), and
    only MAX_OUTPUT bytes of its output are kept, whatever it prints."""
    user, group, groups = _ids(account)
    deadline = time.monotonic() + timeout_s
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd="/", env=dict(env),
                                start_new_session=True, user=user, group=group,
                                extra_groups=groups)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return RunResult(None, getattr(exc, "strerror", None) or str(exc))
    assert proc.stdout is not None
    try:
        output = _collect(proc, proc.stdout, deadline)
        finished = proc.returncode is not None  # before the group is killed
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        proc.stdout.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(_GRACE_S)
    text = output.decode("utf-8", errors="replace")
    if not finished or proc.returncode is None:
        return RunResult(None, f"did not finish within {timeout_s:.0f} s")
    return RunResult(proc.returncode, text)


def _collect(proc: subprocess.Popen[bytes], pipe: IO[bytes], deadline: float) -> bytes:
    """The child's output until EOF, the deadline, or _GRACE_S after the child exited; the first
    and last MAX_OUTPUT / 2 bytes of it."""
    half = MAX_OUTPUT // 2
    head, tail, dropped = bytearray(), bytearray(), 0
    exit_fd = os.pidfd_open(proc.pid)
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(pipe, selectors.EVENT_READ)
            sel.register(exit_fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready = sel.select(left)
                if any(key.fd == exit_fd for key, _ in ready):
                    sel.unregister(exit_fd)
                    proc.wait()
                    deadline = min(deadline, time.monotonic() + _GRACE_S)
                if any(key.fileobj is pipe for key, _ in ready):
                    chunk = os.read(pipe.fileno(), 1 << 16)
                    if not chunk:  # EOF: wait for the exit, up to the deadline
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(max(deadline - time.monotonic(), 0))
                        break
                    room = max(half - len(head), 0)
                    head += chunk[:room]
                    tail += chunk[room:]
                    if len(tail) > half:
                        dropped += len(tail) - half
                        del tail[:-half]
    finally:
        os.close(exit_fd)
    gap = f"\n[... {dropped} bytes left out ...]\n".encode() if dropped else b""
    return bytes(head + gap + tail)
