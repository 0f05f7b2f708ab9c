"""The `check` and `doctor` commands: the host checks (`mi50d.host.doctor`) run by mi50d itself,
so that they answer for the account its instances run as, not for whoever runs `mi50ctl`.

Both read the daemon's own configuration directory from disk at the time of the request (as a
local `mi50ctl check` does), never a directory the client names: a client must not make a root
daemon run a binary of its choosing as the service account. The checks read files and start short
children, so they run in a thread of their own, at most `MAX_RUNNING` at once (a stuck check holds
its slot, never the event loop or the default executor), and a request stops waiting for them
after `CHECK_TIMEOUT_S`, below mi50ctl's reply timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from mi50d.config import ConfigError, load_daemon_config
from mi50d.control.protocol import (
    CheckArgs,
    CheckedAs,
    CheckInfo,
    CheckResult,
    DoctorArgs,
    DoctorResult,
    ErrorCode,
    ProtocolError,
)
from mi50d.control.view import DaemonView
from mi50d.host import doctor as host_doctor
from mi50d.host.access import account_name
from mi50d.host.accounts import AccountError, resolve_account
from mi50d.host.checks import Check

log = logging.getLogger("mi50d.control.checks")

CHECK_TIMEOUT_S = 100.0
MAX_RUNNING = 2
_slots = threading.BoundedSemaphore(MAX_RUNNING)

T = TypeVar("T")


def _infos(checks: Sequence[Check]) -> list[CheckInfo]:
    return [CheckInfo.model_validate(c.to_json()) for c in checks]


def _timed_out(what: str) -> CheckInfo:
    return CheckInfo(name="checks", status="fail",
                     message=f"{what} did not finish within {CHECK_TIMEOUT_S:g} s (a check is "
                             "stuck: a FIFO, a hung mount or a binary that does not exit?)",
                     fix="journalctl -u mi50d; mi50ctl check again once it is fixed")


def service_account(config_dir: Path) -> str:
    """The account this daemon's instances run as by the configuration on disk: the configured
    `user` when it is root, else its own."""
    try:
        user = load_daemon_config(config_dir).user
    except ConfigError:
        return account_name(None) if os.geteuid() != 0 else "?"
    try:
        return account_name(resolve_account(user))
    except AccountError:
        return f"{user} (no such user)"


def _crashed(what: str, exc: Exception) -> Check:
    """A check that raised: one failed line with the cause; the traceback goes to the log."""
    log.error("check_crashed what=%s", what, exc_info=exc)
    return Check("checks", "fail", f"{what} stopped on {type(exc).__name__}: {exc}",
                 "a bug in mi50d (the traceback is in its journal); mi50d --check-config may "
                 "name the input that caused it")


async def _in_thread(job: Callable[[], T]) -> T:
    """Run `job` in a daemon thread (one that never holds up the daemon's exit); raise
    TimeoutError after CHECK_TIMEOUT_S, leaving the thread to finish on its own."""
    if not _slots.acquire(blocking=False):
        raise ProtocolError(ErrorCode.BUSY, f"{MAX_RUNNING} checks are already running in "
                                            "mi50d; try again when they finish")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            value, error = job(), None
        except Exception as exc:
            value, error = None, exc
        finally:
            _slots.release()
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="mi50d-check", daemon=True).start()
    async with asyncio.timeout(CHECK_TIMEOUT_S):
        return await done


async def check(daemon: DaemonView, args: CheckArgs, emit: object) -> CheckResult:
    """`check {name: str}` -> result `CheckResult {checked_as: {pid, account, config_dir},
    instance, checks: [{name, status, message, fix, data}], problems: [str]}`: the instance's
    preflight, as mi50d runs it before a start. `problems` lists every configuration error when
    the directory does not load. Errors: unknown_instance; busy (too many checks running).
    """
    config_dir, socket_path = daemon.config_dir, daemon.socket_path

    def job() -> tuple[list[Check], list[str], str]:
        account = service_account(config_dir)
        try:
            return host_doctor.check_instance(config_dir, args.name, socket_path), [], account
        except ConfigError as exc:
            return [], exc.problems, account
        except host_doctor.UnknownInstance as exc:
            raise ProtocolError(ErrorCode.UNKNOWN_INSTANCE, str(exc)) from None
        except Exception as exc:
            return [_crashed(f"the checks of {args.name}", exc)], [], account

    try:
        checks, problems, account = await _in_thread(job)
        infos = _infos(checks)
    except TimeoutError:
        account, infos, problems = "?", [_timed_out(f"the checks of {args.name}")], []
    checked_as = CheckedAs(pid=os.getpid(), account=account, config_dir=str(config_dir))
    return CheckResult(checked_as=checked_as, instance=args.name, checks=infos,
                       problems=problems)


async def doctor(daemon: DaemonView, args: DoctorArgs, emit: object) -> DoctorResult:
    """`doctor {}` -> result `DoctorResult {checked_as, host: [check], instances: {name:
    [check]}}`: the host checklist and every instance's preflight, as `mi50ctl doctor` shows them.
    Errors: busy (too many checks running).
    """
    config_dir, socket_path = daemon.config_dir, daemon.socket_path

    def job() -> tuple[host_doctor.Report, str]:
        account = service_account(config_dir)
        try:
            return host_doctor.run_doctor(config_dir, socket_path), account
        except Exception as exc:
            return host_doctor.Report([_crashed("doctor", exc)]), account

    checked_as = CheckedAs(pid=os.getpid(), account="?", config_dir=str(config_dir))
    try:
        report, account = await _in_thread(job)
    except TimeoutError:
        return DoctorResult(checked_as=checked_as, host=[_timed_out("doctor")])
    return DoctorResult(checked_as=checked_as.model_copy(update={"account": account}),
                        host=_infos(report.host),
                        instances={n: _infos(cs) for n, cs in report.instances.items()})
