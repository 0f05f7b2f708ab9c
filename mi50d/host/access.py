"""Checking and running things *as the account* an instance runs as, not as the daemon.

A root daemon can read a 0600 model that the `mi50d` account cannot; only a check made with that
account's uid, gid and supplementary groups tells the truth. Both helpers start a short child
through subprocess's `user`/`group`/`extra_groups` (the ids are switched in the child before
exec; no fork of the daemon's threads in Python). With `account=None` (an unprivileged daemon,
whose children run as itself) they check in-process / run directly.
This module owns that identity switch for checks; `mi50d.engine.process` owns it for instances.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mi50d.host.accounts import Account

Mode = Literal["r", "x", "rw"]

# Runs in the child as the account: for each (path, mode), null or the error text.
_CHILD = r"""
import json, os, sys
out = []
for path, mode in json.loads(sys.argv[1]):
    try:
        if mode == "r":
            with open(path, "rb") as f:
                f.read(1)
            out.append(None)
        else:
            want = os.X_OK if mode == "x" else os.R_OK | os.W_OK
            out.append(None if os.access(path, want) else os.strerror(13))
    except OSError as e:
        out.append(e.strerror or str(e))
print(json.dumps(out))
"""


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None: could not start, or timed out
    output: str  # stdout and stderr together, or the reason it did not run

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def last_line(self) -> str:
        lines = [line for line in self.output.splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no output"


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
    user, group, groups = _ids(account)
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, payload],
                              capture_output=True, text=True, timeout=timeout_s, cwd="/",
                              check=False, env={}, user=user, group=group, extra_groups=groups)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"cannot check as {account.name}: {exc}"] * len(requests)
    if done.returncode != 0:
        return [f"cannot check as {account.name}: {done.stderr.strip()[-200:]}"] * len(requests)
    result: list[str | None] = json.loads(done.stdout)
    return result


def _check_here(requests: Sequence[tuple[Path, Mode]]) -> list[str | None]:
    out: list[str | None] = []
    for path, mode in requests:
        try:
            if mode == "r":
                with path.open("rb") as f:
                    f.read(1)
                out.append(None)
            else:
                want = os.X_OK if mode == "x" else os.R_OK | os.W_OK
                out.append(None if os.access(path, want) else os.strerror(13))
        except OSError as exc:
            out.append(exc.strerror or str(exc))
    return out


def run_as(account: Account | None, argv: Sequence[str], env: Mapping[str, str],
           timeout_s: float) -> RunResult:
    """Run `argv` as `account` with `env`, stdin closed, output captured; never raises."""
    user, group, groups = _ids(account)
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              cwd="/", env=dict(env), stdin=subprocess.DEVNULL, check=False,
                              errors="replace", user=user, group=group, extra_groups=groups)
    except subprocess.TimeoutExpired:
        return RunResult(None, f"did not finish within {timeout_s:.0f} s")
    except OSError as exc:
        return RunResult(None, exc.strerror or str(exc))
    return RunResult(done.returncode, done.stdout + done.stderr)
