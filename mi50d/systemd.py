"""systemd integration: sd_notify messages (via the `sdnotify` package), the watchdog ping, the
READY/STATUS announcer and LISTEN_FDS socket activation. All of it is a no-op outside systemd.

The environment variables systemd passes (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*) are read once and
removed from `os.environ`, as sd_notify's `unset_environment` does, so no child inherits them.

Watchdog: `ping_watchdog` is an ordinary task on the daemon's event loop, which also runs every
instance's supervision loop, health probes and the control server. A blocked, busy-looping or
stopped loop (or process) stops the pings and systemd restarts mi50d. Nothing else gates them on
purpose: an instance that fails to load or hangs is the supervisor's job (it kills and restarts
that one); restarting mi50d for it would take every healthy instance down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

import sdnotify

log = logging.getLogger("mi50d.systemd")

NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
SD_LISTEN_FDS_START = 3
EXTEND_EVERY_S = 10.0  # with wait_ready: how often the start timeout is pushed out ...
EXTEND_BY_S = 30.0  # ... and by how much, counted from each message
STATUS_REFRESH_S = 5.0  # STATUS= shows "starting 41s": refresh it even without changes
STATUS_GAP_S = 0.25  # at most four STATUS= updates a second


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as MONOTONIC_USEC= wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Messages to systemd's notification socket; silently nothing when there is none."""

    def __init__(self) -> None:
        env = os.environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_s = _watchdog_interval(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))
        self._sd: sdnotify.SystemdNotifier | None = None
        if self.enabled:
            self._sd = sdnotify.SystemdNotifier()
            if self._sd.socket is not None:
                self._sd.socket.setblocking(False)  # a full queue loses a message, never blocks
        for var in NOTIFY_VARS:
            env.pop(var, None)
        self.ready_sent = False

    def send(self, *fields: str) -> None:
        if self._sd is not None:
            log.debug("sd_notify %s", " ".join(fields))
            self._sd.notify("\n".join(fields))

    def ready(self, status: str) -> None:
        self.ready_sent = True
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                  "STATUS=reloading configuration")

    def reloaded(self, status: str) -> None:
        if self.ready_sent:  # a reload before the first READY (wait_ready) must not announce it
            self.send("READY=1", f"STATUS={status}")
        else:
            self.status(status)

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float, status: str) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", f"STATUS={status}")


def _watchdog_interval(usec: str | None, pid: str | None) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when the watchdog is not ours."""
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("watchdog_ignored WATCHDOG_USEC=%r is not a number", usec)
        return None
    return value / 2_000_000 if value > 0 else None


async def ping_watchdog(notifier: Notifier) -> None:
    """WATCHDOG=1 every half WATCHDOG_USEC for as long as the loop runs; returns if unset."""
    if notifier.watchdog_s is None or not notifier.enabled:
        return
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(notifier.watchdog_s)


async def announce(notifier: Notifier, summary: Callable[[], str], changed: asyncio.Event,
                   settled: Callable[[], bool] | None = None) -> None:
    """READY=1 once `settled()` holds (at once when None), pushing systemd's start timeout out
    meanwhile; then STATUS= with `summary()` whenever it changes. `changed` is set by whoever
    changes what `summary` reports; this task clears it."""
    if settled is not None:
        next_extend = 0.0
        while not settled():
            if time.monotonic() >= next_extend:
                notifier.extend_timeout(EXTEND_BY_S, summary())
                next_extend = time.monotonic() + EXTEND_EVERY_S
            changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXTEND_EVERY_S):
                    await changed.wait()
    last = summary()
    notifier.ready(last)
    log.info("daemon_ready_notified status=%s", last)
    while True:
        changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STATUS_REFRESH_S):
                await changed.wait()
        text = summary()
        if text != last:
            notifier.status(text)
            last = text
        await asyncio.sleep(STATUS_GAP_S)  # changes meanwhile are coalesced into the next one


def listen_socket() -> socket.socket | None:
    """The stream socket systemd passed (fd 3) when LISTEN_PID is us, else None."""
    env = os.environ
    pid, fds = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for var in LISTEN_VARS:
        env.pop(var, None)
    if not fds or pid != str(os.getpid()):
        return None
    try:
        count = int(fds)
    except ValueError:
        return None
    if count < 1:
        return None
    if count > 1:
        log.warning("listen_fds_extra count=%d: using the first, closing the others", count)
        for fd in range(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + count):
            with contextlib.suppress(OSError):
                os.close(fd)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError("the socket passed by systemd (fd 3) is not a Unix stream socket; "
                         "use ListenStream=/path in mi50d.socket")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock
