"""Who may hold a control connection: per-uid limits with slots kept for root and the daemon's own
uid, and what to do when `accept()` itself fails.

One group member must not lock everyone out by holding connections (`mi50ctl logs -f` in 300
terminals): each unprivileged uid holds at most `per_uid`, all of them together at most
`limit - reserved`, and root and the daemon's own uid may use every slot up to `limit`. A refused
client is accepted just long enough to read one error frame saying why.

When the daemon runs out of file descriptors, `accept()` fails with EMFILE and the client stays in
the kernel's backlog. A spare descriptor (an open /dev/null) is then closed to accept the waiting
clients one at a time and tell each that mi50d is out of descriptors, so nobody waits in silence.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass, field

from mi50d.control.protocol import ErrorCode, ErrorFrame, ErrorInfo, encode

log = logging.getLogger("mi50d.control.server")

MAX_CLIENTS = 256  # every connection at once, privileged or not
RESERVED = 32  # of those, only root and the daemon's own uid may use
PER_UID = 64  # one unprivileged uid at once
SHED_MAX = 64  # clients told "out of descriptors" per accept error, before backing off

# accept() errors about the one client that was leaving: take the next one at once.
CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN,
                         errno.EPERM})
# The daemon is out of descriptors: shed waiting clients with the spare, then back off.
OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE})


@dataclass
class Admission:
    """Connections held per uid. `admit` before serving a client, `release` when it ends."""

    limit: int = MAX_CLIENTS
    reserved: int = RESERVED
    per_uid: int = PER_UID
    privileged: frozenset[int] = field(default_factory=lambda: frozenset({0, os.geteuid()}))
    held: Counter[int | None] = field(default_factory=Counter)
    total: int = 0

    def refusal(self, uid: int | None) -> str | None:
        """None when `uid` may connect now, else the one-line reason it may not."""
        if uid in self.privileged:
            if self.total >= self.limit:
                return (f"too many clients ({self.total}, limit {self.limit}); close some "
                        "mi50ctl logs -f")
            return None
        if self.held[uid] >= self.per_uid:
            return (f"too many clients for uid {uid} (limit {self.per_uid}); close some "
                    "mi50ctl logs -f")
        shared = self.limit - self.reserved
        if self.total >= shared:
            return (f"too many clients ({self.total}; users other than root may hold {shared});"
                    " close some mi50ctl logs -f")
        return None

    def admit(self, uid: int | None) -> None:
        self.held[uid] += 1
        self.total += 1

    def release(self, uid: int | None) -> None:
        self.held[uid] -= 1
        if self.held[uid] <= 0:
            del self.held[uid]
        self.total -= 1


def refuse(conn: socket.socket, code: ErrorCode, message: str) -> None:
    """Send one error frame without waiting (it fits any socket buffer) and close. The request
    the client may have sent is not read: the frame is already in its receive queue."""
    with conn:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.send(encode(ErrorFrame(id=None, error=ErrorInfo(code=code, message=message))))


class Spare:
    """One descriptor held back, to be given up when accept() fails with EMFILE."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.reopen()

    def reopen(self) -> None:
        if self.fd is None:
            with contextlib.suppress(OSError):
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def shed(self, listener: socket.socket) -> int:
        """Accept each client waiting in the backlog with the spare's slot, tell it mi50d is out
        of file descriptors, close it. Returns how many were told; 0 when there is no spare."""
        told = 0
        while self.fd is not None and told < SHED_MAX:
            self.close()
            try:
                conn, _ = listener.accept()
            except OSError:  # the backlog is empty, or the slot went to another thread
                break
            refuse(conn, ErrorCode.BUSY, "mi50d is out of file descriptors (too many open "
                                         "files); try again shortly")
            told += 1
            self.reopen()
        self.reopen()
        return told


def accept_error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))
