"""A blocking client of mi50d's control socket. Imports only the standard library and
`mi50d.control.protocol`, so that `mi50ctl status` starts fast.

Failures are raised as `ClientError` subclasses; rendering them is the CLI's job.
"""

from __future__ import annotations

import errno
import os
import socket
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
    conf = Path(os.environ.get("MI50D_CONFIG_DIR", DEFAULT_CONFIG_DIR)) / "mi50d.toml"
    try:
        with conf.open("rb") as f:
            configured = tomllib.load(f).get("socket")
    except (OSError, tomllib.TOMLDecodeError):
        configured = None
    if isinstance(configured, str) and configured:
        return configured
    return DEFAULT_SOCKET


class Client:
    """One connection per call; the socket path is resolved on first use."""

    def __init__(self, socket_path: str | None = None) -> None:
        self._explicit = socket_path
        self._path: str | None = None
        self._next_id = 0

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = resolve_socket(self._explicit)
        return self._path

    def call(self, command: str, args: dict[str, Any] | None = None,
             timeout_s: float | None = REPLY_TIMEOUT_S) -> Any:
        """Send one request and return its result (events, if any, are skipped)."""
        for frame in self.stream(command, args, timeout_s):
            if isinstance(frame, ResultFrame):
                return frame.result
        raise DaemonUnavailable(self.path, "closed the connection without a reply")

    def stream(self, command: str, args: dict[str, Any] | None = None,
               timeout_s: float | None = REPLY_TIMEOUT_S) -> Iterator[EventFrame | ResultFrame]:
        """Send one request; yield its event frames, then its result frame. An error frame is
        raised as RemoteError. `timeout_s` bounds the wait for each frame (None: no bound)."""
        self._next_id += 1
        request_id = self._next_id
        line = request_line(request_id, command, args)
        with self._connect() as sock:
            sock.settimeout(timeout_s)
            try:
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
                raise ClientError(exc.message) from None
            except TimeoutError:
                raise ClientError(f"no reply from mi50d within {timeout_s:g}s on "
                                  f"{self.path}") from None
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
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EACCES:
                raise AccessDenied(path) from None
            raise DaemonUnavailable(path, exc.strerror or str(exc)) from None
        return sock
