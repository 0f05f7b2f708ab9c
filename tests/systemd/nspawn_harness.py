"""Real systemd for the end-to-end test: a cached Debian root (12 or 13), the .deb, a booted container.

This module owns three slow artefacts and how they are reused:
- `debian_root(suite)`: `debootstrap --variant=minbase` of bookworm (systemd 252) or trixie
  (257), cached under `~/.cache/mi50d/rootfs/e2e-<suite>-<key>/` by `rootfs.cached_root`, where
  the key hashes the recipe; built in a temporary directory and renamed into place, so a
  half-built root is never reused.
- `build_deb(repo, suite)` (tests/systemd/debbuild.py): the .deb for that suite, cached by a
  hash of the repository's files.
- `Machine`: one boot of the cached root with `systemd-nspawn --volatile=overlay`; every write
  goes to a tmpfs that vanishes at power-off, so the cache is never modified.

The host drives the container through `nsenter` into the container's init, the way an
operator's shell would run commands on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.systemd import rootfs
from tests.systemd.debbuild import build_deb as build_deb

# The Debian releases the end-to-end test boots: bookworm has systemd 252, trixie 257, which
# bracket Ubuntu 24.04's 255.
SUITES = ("bookworm", "trixie")
DEFAULT_SUITE = "bookworm"
# What the container needs beyond minbase: an init, D-Bus, the .deb's runtime dependencies
# (so `apt-get install ./mi50d_*.deb` resolves them from the local cache), the llama-server
# CPU build's shared libraries, and the tools the test uses inside (curl, ps, setpriv/useradd).
ROOT_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-gi",
    "gir1.2-glib-2.0",
    "python3-systemd",
    "curl",
    "ca-certificates",
    "procps",
    "passwd",
    "libgomp1",
    "nftables",  # enforces an rpc-worker's allow (its unit runs nft)
)
# Libraries whose package name carries the soname, so it differs per release.
SUITE_PACKAGES = {
    "bookworm": ("libcurl4", "libssl3"),
    "trixie": ("libcurl4t64", "libssl3t64"),
}
# Units that have nothing to do in a throwaway container and would only slow the boot or
# mark the system degraded.
MASKED_UNITS = (
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "console-getty.service",
    "getty@tty1.service",
)
CONTAINER_PATH = rootfs.CONTAINER_PATH
HOST_DIR_IN_CONTAINER = "/srv/e2e"
cache_root = rootfs.cache_root
_locked = rootfs.locked
_prune = rootfs.prune


def recipe(suite: str = DEFAULT_SUITE) -> rootfs.Recipe:
    if suite not in SUITE_PACKAGES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    files = {"etc/hostname": "mi50d-e2e\n",
             # An empty machine-id makes systemd generate a fresh one at each boot (in RAM).
             "etc/machine-id": "",
             **{f"etc/systemd/system/{unit}": "@/dev/null" for unit in MASKED_UNITS}}
    # "e2e-" keeps these apart from the roots of the harness before rootfs.py ("bookworm-<key>").
    return rootfs.Recipe(name=f"e2e-{suite}", suite=suite, include=ROOT_PACKAGES + SUITE_PACKAGES[suite],
                         files=files)


def debian_root(suite: str = DEFAULT_SUITE) -> Path:
    """The cached root of `suite`, built on first use (a few minutes; later calls are instant)."""
    return rootfs.cached_root(recipe(suite))


# ---------------------------------------------------------------------------------------------
# A booted container


class CommandFailed(AssertionError):
    pass


class Machine:
    """One boot of `root`; `host_dir` is bind-mounted read-only at /srv/e2e inside."""

    def __init__(self, root: Path, host_dir: Path, log_path: Path) -> None:
        self.root = root
        self.host_dir = host_dir
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot",
             "--volatile=overlay", "--console=read-only", f"--directory={root}",
             # Its own network namespace: instances' ports cannot clash with the host's.
             "--private-network",
             # bpf() is outside nspawn's default system call filter; without it systemd in the
             # container cannot attach IPAddressAllow=/IPAddressDeny= and ignores them
             # (a unit with IPAddressDeny=any reached a loopback server; with it, dropped).
             "--system-call-filter=bpf",
             f"--bind-ro={host_dir}:{HOST_DIR_IN_CONTAINER}", "--machine=mi50d-e2e"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.init_pid = self._find_init()

    def _find_init(self, timeout_s: float = 60.0) -> int:
        """The host pid of the container's PID 1: a descendant of nspawn whose NSpid ends in 1."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited early; see {self.log_path}")
            for pid in _descendants(self.nspawn.pid):
                if _nspid(pid)[-1:] == [1] and len(_nspid(pid)) > 1:
                    return pid
            time.sleep(0.05)
        raise RuntimeError("the container's init did not appear")

    def run(self, *argv: str, user: str | None = None, check: bool = True,
            timeout: float = 120.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (as root, or as `user` with that user's groups)."""
        cmd = ["nsenter", "-t", str(self.init_pid), "-a", "--",
               "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "TERM=dumb"]
        if user is not None:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                    "--reset-env", "--"]
        cmd += list(argv)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              input=input, check=False)
        if check and proc.returncode != 0:
            raise CommandFailed(
                f"{' '.join(argv)!r} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
            )
        return proc

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-ec", script, check=check)

    def write(self, path: str, text: str) -> None:
        self.run("/bin/sh", "-ec", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path,
                 input=text)

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-u", unit, "-b", "--no-pager", "-o", "cat").stdout

    def wait_booted(self, timeout: float = 120.0) -> str:
        """Wait for `systemctl is-system-running --wait`; return its verdict."""
        deadline = time.monotonic() + timeout
        while True:
            # The bus socket appears a moment after PID 1; until then systemctl cannot connect.
            proc = self.run("systemctl", "is-system-running", "--wait", check=False,
                            timeout=max(1.0, deadline - time.monotonic()))
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return state
            if time.monotonic() > deadline:
                raise RuntimeError(f"container did not finish booting: {state!r} {proc.stderr}")
            time.sleep(0.2)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def pids_of(self, comm: str) -> list[int]:
        """Container pids of processes whose command name is `comm`."""
        proc = self.run("pgrep", "-x", comm, check=False)
        return [int(p) for p in proc.stdout.split()]

    def poweroff(self, timeout: float = 30.0) -> None:
        """Power off cleanly; if that does not finish, kill the container's init and nspawn."""
        if self.nspawn.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, CommandFailed):
                self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            try:
                self.nspawn.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # SIGKILL to the namespace's init ends every process in it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
                try:
                    self.nspawn.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.nspawn.pid, signal.SIGKILL)
                    self.nspawn.wait()
        self._log.close()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _descendants(pid: int) -> Iterator[int]:
    stack = _children(pid)
    while stack:
        child = stack.pop()
        yield child
        stack.extend(_children(child))


def _nspid(pid: int) -> list[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(p) for p in line.split()[1:]]
    except OSError:
        pass
    return []


def poll(what: str, probe: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait until `probe()` is true; fail naming `what`. Checks state, never asserts a duration."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
