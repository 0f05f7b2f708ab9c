"""mi50ctl's exit codes, and the one place that turns the client's failures into them.

Each code means one thing, so that a script can tell "mi50d is down" from "mi50d is up but did not
answer in time" from "mi50d (or the socket's permissions) said no":

    0   done
    1   the request failed: a start that failed or timed out, a check that failed, an error reply
    2   bad usage (click), or an argument outside the protocol's bounds
    3   `status`: the named instance (or an autostart one) is not running
    4   no such instance
    69  EX_UNAVAILABLE: mi50d is not reachable (no socket, nothing listens, it went away)
    75  EX_TEMPFAIL: mi50d did not answer in time, or is out of file descriptors; try again
    76  EX_PROTOCOL: the reply is not this protocol (mismatched versions)
    77  EX_NOPERM: refused: no permission on the socket, or too many connections for your uid
    78  EX_CONFIG: the configuration was rejected (`reload`, `check`)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from mi50ctl.client import (
    AccessDenied,
    BadArguments,
    ClientError,
    DaemonUnavailable,
    ProtocolMismatch,
    RemoteError,
    ReplyTimeout,
)

EX_FAILED = 1
EX_USAGE = 2
EX_NOT_RUNNING = 3
EX_UNKNOWN = 4
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78

EPILOG = """\b
Exit codes: 0 done; 1 the request failed; 2 bad usage; 3 (status) not running;
4 no such instance; 69 mi50d not reachable; 75 no answer in time (or mi50d out of
file descriptors), try again; 76 protocol mismatch; 77 refused (socket permission,
or too many connections from your uid); 78 configuration rejected."""


class Unreachable(click.ClickException):
    exit_code = EX_UNAVAILABLE


class TimedOut(click.ClickException):
    exit_code = EX_TEMPFAIL


class Mismatch(click.ClickException):
    exit_code = EX_PROTOCOL


class Refused(click.ClickException):
    exit_code = EX_NOPERM


class UnknownName(click.ClickException):
    exit_code = EX_UNKNOWN


class ConfigRejected(click.ClickException):
    exit_code = EX_CONFIG


class Failed(click.ClickException):
    exit_code = EX_FAILED


def translate(exc: ClientError) -> click.ClickException:
    """The message and exit code for one of the client's failures."""
    if isinstance(exc, AccessDenied):
        return Refused(f"permission denied on {exc.path}; join the group: "
                       f"sudo usermod -aG {exc.group()} $USER, then log in again")
    if isinstance(exc, DaemonUnavailable):
        if exc.detail in ("no socket", "nothing listens"):
            return Unreachable(f"mi50d is not running ({exc.detail} at {exc.path}); start it: "
                               "systemctl start mi50d")
        return Unreachable(f"mi50d: {exc}")
    if isinstance(exc, ReplyTimeout):
        return TimedOut(str(exc))
    if isinstance(exc, ProtocolMismatch):
        return Mismatch(str(exc))
    if isinstance(exc, BadArguments):
        return click.UsageError(str(exc))
    if isinstance(exc, RemoteError):
        if exc.code == "unknown_instance":
            return UnknownName(exc.message)
        if exc.code == "config_error":
            return ConfigRejected("\n".join([*exc.details,
                                             "reload rejected; the running set was kept"]))
        if exc.code == "too_many_clients":
            return Refused(f"mi50d refused the connection: {exc.message}")
        if exc.code == "busy":
            return TimedOut(f"mi50d is busy: {exc.message}")
        return Failed(f"mi50d: {exc.message} ({exc.code})")
    return Failed(str(exc))


@contextlib.contextmanager
def client_errors() -> Iterator[None]:
    """Turn the client's failures into messages and exit codes."""
    try:
        yield
    except ClientError as exc:
        raise translate(exc) from None
