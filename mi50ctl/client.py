"""A blocking client of mi50d's control socket. Imports only the standard library and
`mi50d.control.protocol`, so that `mi50ctl status` starts fast.

Failures are raised as `ClientError` subclasses; rendering them is the CLI's job.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mi50d.control.protocol import (
    DEFAULT_SOCKET,
    ErrorFrame,
    EventFrame,
    ProtocolError,
    ResultFrame,
    parse_frame,
    request_line,
)

DEFAULT_CONFIG_DIR = "/etc/mi50d"
REPLY_TIMEOUT_S = 120.0  # `stop` of every instance waits for each one's stop timeout
CONNECT_TIMEOUT_S = 5.0
MAX_REPLY_LINE = 256 * 1024 * 1024  # logs -n 100000 of long lines is big, but bounded


class ClientError(Exception):
    pass


class ReplyTimeout(ClientError):
    """mi50d is there but did not answer (or accept) in time: stuck, or busy."""


class BadArguments(ClientError):
    """Arguments the protocol refuses (caught before anything is sent)."""


class ProtocolMismatch(ClientError):
    """A reply that is not this protocol: another version of mi50d, or not mi50d at all."""


class DaemonUnavailable(ClientError):
    """No daemon at the socket: missing, refused, or it went away mid-reply."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


class AccessDenied(ClientError):
    def __init__(self, path: str) -> None:
        super().__init__(f"{path}: permission denied")
        self.path = path

    def group(self) -> str:
        """The group to join: the socket's own when the group may use it, else `socket_group`
        in mi50d.toml, else mi50d."""
        with contextlib.suppress(OSError, KeyError):
            st = os.stat(self.path)
            if st.st_mode & (stat.S_IRGRP | stat.S_IWGRP) == stat.S_IRGRP | stat.S_IWGRP:
                return grp.getgrgid(st.st_gid).gr_name
        configured = _configured("socket_group")
        return configured if isinstance(configured, str) and configured else "mi50d"


class RemoteError(ClientError):
    """An error frame from mi50d."""

    def __init__(self, code: str, message: str, details: list[str]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


def resolve_socket(explicit: str | None) -> str:
    """--socket/MI50D_SOCKET, else `socket` in $MI50D_CONFIG_DIR/mi50d.toml (when readable), else
    the first of the daemon's default and the packaged socket unit's path that exists."""
    if explicit:
        return explicit
    configured = _configured("socket")
    if isinstance(configured, str) and configured:
        return configured
    return DEFAULT_SOCKET


def _configured(key: str) -> object:
    """`key` in $MI50D_CONFIG_DIR/mi50d.toml, or None when unreadable or unset."""
    conf = Path(os.environ.get("MI50D_CONFIG_DIR", DEFAULT_CONFIG_DIR)) / "mi50d.toml"
    try:
        with conf.open("rb") as f:
            return tomllib.load(f).get(key)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None


class Client:
    """One connection per call; the socket path is resolved on first use."""

    def __init__(self, socket_path: str | None = None,
                 reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self._explicit = socket_path
        self._path: str | None = None
        self._next_id = 0
        self.reply_timeout_s = reply_timeout_s

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = resolve_socket(self._explicit)
        return self._path

    def call(self, command: str, args: dict[str, Any] | None = None,
             timeout_s: float | None = None) -> Any:
        """Send one request and return its result (events, if any, are skipped); wait at most
        `timeout_s` (default: the client's reply timeout) for it."""
        for frame in self.stream(command, args, timeout_s or self.reply_timeout_s):
            if isinstance(frame, ResultFrame):
                return frame.result
        raise DaemonUnavailable(self.path, "closed the connection without a reply")

    def stream(self, command: str, args: dict[str, Any] | None = None,
               timeout_s: float | None = REPLY_TIMEOUT_S) -> Iterator[EventFrame | ResultFrame]:
        """Send one request; yield its event frames, then its result frame. An error frame is
        raised as RemoteError. `timeout_s` bounds the wait for each frame (None: no bound)."""
        self._next_id += 1
        request_id = self._next_id
        try:
            line = request_line(request_id, command, args)
        except ValueError as exc:  # pydantic's ValidationError: the protocol's own bounds
            raise BadArguments(_first_problem(exc)) from None
        with self._connect() as sock:
            sock.settimeout(timeout_s)
            try:
                # Refused before reading (too many clients): why is already in our receive queue.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(line)
                replies = sock.makefile("rb")
                while True:
                    raw = replies.readline(MAX_REPLY_LINE)
                    if not raw.endswith(b"\n"):
                        raise DaemonUnavailable(self.path, "mi50d closed the connection "
                                                           "(did it stop?)")
                    frame = parse_frame(raw)
                    if frame.id != request_id:
                        if isinstance(frame, ErrorFrame):
                            raise RemoteError(frame.error.code, frame.error.message,
                                              frame.error.details)
                        continue  # not ours; cannot happen on a one-request connection
                    if isinstance(frame, ErrorFrame):
                        raise RemoteError(frame.error.code, frame.error.message,
                                          frame.error.details)
                    yield frame
                    if isinstance(frame, ResultFrame):
                        return
            except ProtocolError as exc:
                raise ProtocolMismatch(exc.message) from None
            except TimeoutError:
                raise ReplyTimeout(f"no reply from mi50d within {timeout_s:g}s on "
                                   f"{self.path} (it is stuck or overloaded; its journal says "
                                   "more: journalctl -u mi50d)") from None
            except ConnectionError as exc:
                raise DaemonUnavailable(self.path, f"connection lost: {exc.strerror}") from None

    def _connect(self) -> socket.socket:
        path = self.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(path)
        except PermissionError:
            sock.close()
            raise AccessDenied(path) from None
        except (FileNotFoundError, NotADirectoryError):
            sock.close()
            raise DaemonUnavailable(path, "no socket") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonUnavailable(path, "nothing listens") from None
        except TimeoutError:  # a full backlog: mi50d does not accept
            sock.close()
            raise ReplyTimeout(f"mi50d did not accept the connection on {path} within "
                               f"{CONNECT_TIMEOUT_S:g}s (it is stuck or overloaded)") from None
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EACCES:
                raise AccessDenied(path) from None
            raise DaemonUnavailable(path, exc.strerror or str(exc)) from None
        return sock


def _first_problem(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        field = str(first["loc"][-1]) if first.get("loc") else "argument"
        return f"{field}: {first['msg']}"
    return str(exc)
