"""Helpers for tests of the control plane: a real `mi50d` process on a real socket, a stand-in for
systemd's notification socket, and `mi50ctl` run as a command.

Readiness is awaited on the daemon's own READY=1 datagram, never on a timer.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import FAKE_SERVER, fake_env, toml_text, write_config

BIN = Path(sys.executable).parent
MI50D = str(BIN / "mi50d")
MI50CTL = str(BIN / "mi50ctl")
WAIT_S = 120.0  # upper bound for anything to happen; never a duration we rely on
# Tests that run clients as other uids (setpriv) or chown files.
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="runs clients as other uids (setpriv) "
                             "and chowns files: needs root")


def short_dir() -> Path:
    """A directory short enough for Unix socket paths (108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="m5", dir="/tmp"))


def server_instance(request: pytest.FixtureRequest, port: int, **extra: Any) -> dict[str, Any]:
    """An instance table running the real llama-server on the tiny model (the session fixtures
    of tests/conftest.py); tests using it carry the `llama` mark."""
    llama = request.getfixturevalue("llama_server")
    model = request.getfixturevalue("tiny_model")
    return {"llama_server": str(llama), "model": str(model), "port": port, "ctx_size": 256,
            "threads": 1, **extra}


def fake_instance(port: int, **extra: Any) -> dict[str, Any]:
    """The fake server, for fault injection only; FAKE_* variables go in `env`."""
    env = extra.pop("env", {})
    return {"llama_server": str(FAKE_SERVER), "model": "/dev/null", "port": port,
            "env": fake_env(**env), **extra}


def write_instance(directory: Path, name: str, table: Mapping[str, Any]) -> None:
    (directory / f"{name}.toml").write_text(toml_text(table))


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET; keeps every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        text = self.sock.recv(65536).decode()
        self.messages.append(text)
        return text

    def drain(self) -> list[str]:
        """Every message already queued, without waiting."""
        got = []
        while (text := self.receive(0)) is not None:
            got.append(text)
        return got

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = WAIT_S,
                 alive: Callable[[], bool] = lambda: True) -> str:
        """Receive until a message satisfies `predicate`; return it. Gives up early once
        `alive()` turns false (the sender exited), checked between messages."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            text = self.receive(min(left, 0.5)) if left > 0 else None
            if text is None and left > 0 and alive():
                continue
            if text is None:
                raise AssertionError(f"no matching notification within {timeout}s; got "
                                     f"{self.messages[-10:]}")
            if predicate(text):
                return text


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    config: Path
    notify: NotifySocket
    log: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    def ctl(self, *args: str, user: str | None = None,
            timeout: float = WAIT_S) -> subprocess.CompletedProcess[str]:
        return mi50ctl("--socket", str(self.socket), *args, user=user, timeout=timeout)

    def log_text(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        """Stop it if running, and remove its working directory."""
        self.stop()
        self.notify.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def mi50ctl(*args: str, user: str | None = None, timeout: float = WAIT_S,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `mi50ctl` (as `user` through setpriv, when given)."""
    prefix = []
    if user:
        pw = pwd.getpwnam(user)
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MI50D_", "NOTIFY_"))}
    return subprocess.run([*prefix, MI50CTL, *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})}, check=False)


def start_daemon(config: Path, workdir: Path, env: Mapping[str, str] | None = None,
                 socket_path: Path | None = None, wait_ready: bool = True,
                 argv_prefix: list[str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> Daemon:
    """A real `mi50d --config-dir CONFIG --socket SOCK`, started and awaited on its READY=1."""
    sock = socket_path or workdir / "c.sock"
    notify = NotifySocket(workdir / "n.sock")
    log = workdir / "mi50d.log"
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("MI50D_")},
                "NOTIFY_SOCKET": str(notify.path), **(env or {})}
    argv = [*(argv_prefix or []), MI50D, "--config-dir", str(config), "--socket", str(sock),
            "--log-level", "debug"]
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, env=full_env, stdout=err, stderr=err, pass_fds=pass_fds)
    daemon = Daemon(proc, sock, config, notify, log, workdir, full_env)
    if wait_ready:
        try:
            notify.wait_for(lambda m: "READY=1" in m.splitlines(),
                            alive=lambda: proc.poll() is None)
        except AssertionError:
            daemon.stop()
            raise AssertionError(f"mi50d did not become ready:\n{log.read_text()}") from None
    return daemon


@contextlib.contextmanager
def running_daemon(daemon_settings: Mapping[str, Any],
                   instances: Mapping[str, Mapping[str, Any]],
                   env: Mapping[str, str] | None = None) -> Iterator[Daemon]:
    """Write a configuration, run mi50d on it until the block ends, then SIGTERM and reap it."""
    workdir = short_dir()
    config = write_config(workdir / "cfg", {"preflight": False, **daemon_settings}, instances)
    daemon = start_daemon(config, workdir, env)
    try:
        yield daemon
    finally:
        daemon.close()


def read_line(stream: Any, timeout: float = WAIT_S) -> str:
    """One line from an unbuffered binary pipe (Popen(bufsize=0)), waited for under a timeout;
    "" at end of file."""
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([stream], [], [], timeout)
        if not ready:
            raise AssertionError(f"no output within {timeout}s (so far {line!r})")
        byte = stream.read(1)
        if not byte:
            break
        line += byte
    return line.decode()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Re-check `predicate` until it holds; for conditions with no event to wait on (another
    process's state), checked often, bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def process_state(pid: int) -> str:
    """The one-letter state of a process from /proc (R, S, T for stopped, Z, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def follow_request(name: str) -> bytes:
    """A `logs -f` request line: a connection the daemon holds until the client leaves."""
    request = {"v": 1, "id": 1, "command": "logs", "args": {"name": name, "n": 0, "follow": True}}
    return json.dumps(request).encode() + b"\n"


def first_frame(sock: socket.socket) -> dict[str, Any]:
    """Read one frame, byte by byte (nothing of a later frame is consumed), under WAIT_S."""
    sock.settimeout(WAIT_S)
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise AssertionError(f"connection closed before a whole frame: {line!r}")
        line += byte
    frame: dict[str, Any] = json.loads(line)
    return frame


def held_follower(path: Path, name: str) -> tuple[socket.socket, dict[str, Any]]:
    """A connection asking for `logs -f NAME`, and the first frame it got: the backlog when it
    is held, an error when it was refused (then it is closed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(str(path))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(follow_request(name))
    try:
        frame = first_frame(sock)
    except BaseException:
        sock.close()
        raise
    if not frame["ok"]:
        sock.close()
    return sock, frame
