"""Bringing up the systemd mount unit a path needs, over D-Bus (pydbus).

A `nofail` NTFS disk that came up late leaves /mnt/ssd an empty directory on the root file system:
the model "does not exist" though nothing is wrong with it. Before calling a path missing, mi50d
asks systemd to start the mount unit for it (`StartUnit(unit, "replace")` on
org.freedesktop.systemd1.Manager), waits for the unit to become active and re-checks mountinfo.
This module owns systemd's path escaping (`systemd-escape --path`), that conversation and its
one-line result. Every D-Bus call has an explicit timeout and the whole conversation runs in a
worker thread with an overall deadline, so a wedged bus cannot stall a start.
"""

from __future__ import annotations

import concurrent.futures
import os
import string
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mi50d.host.checks import Check, fail, ok
from mi50d.host.mounts import Mount, is_mount_point

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
CALL_TIMEOUT_S = 5.0
# Characters systemd leaves as they are in unit names (besides '/' which becomes '-').
_KEEP = frozenset(string.ascii_letters + string.digits + ":_.")


def escape_path(path: str | os.PathLike[str]) -> str:
    """What `systemd-escape --path` prints: the normalized absolute path without its leading and
    trailing '/', each '/' as '-', and every byte other than [A-Za-z0-9:_.] (and a '.' in front)
    as `\\xNN`; the root is "-". Raises ValueError for relative paths and ".." components."""
    text = str(path)
    if not text.startswith("/"):
        raise ValueError(f"{text!r} is not an absolute path")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{text!r} is not a normalized path ('..')")
    if not parts:
        return "-"
    out = []
    for i, byte in enumerate("/".join(parts).encode()):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif char in _KEEP and not (i == 0 and char == "."):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def mount_unit(path: str | os.PathLike[str]) -> str:
    """The name of the mount unit for mount point `path`: /mnt/ssd -> mnt-ssd.mount."""
    return escape_path(os.path.normpath(path)) + ".mount"


def _pydbus() -> Any:
    """pydbus, imported only when a mount is missing (it pulls in GLib). PyGObject's importer
    raises an ImportWarning on Python >= 3.10 that means nothing to our users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)
        import pydbus
    return pydbus


def _get(bus: Any, object_path: str, prop: str) -> str:
    obj = bus.get(SYSTEMD, object_path, timeout=CALL_TIMEOUT_S)
    value: str = obj[PROPS_IFACE].Get(UNIT_IFACE, prop, timeout=CALL_TIMEOUT_S)
    return value


def _start_and_wait(pydbus: Any, unit: str, bus_address: str | None, deadline: float) -> str:
    """Start `unit`; return its final ActiveState ("active" on success)."""
    bus = pydbus.connect(bus_address) if bus_address else pydbus.SystemBus()
    manager = bus.get(SYSTEMD, SYSTEMD_PATH, timeout=CALL_TIMEOUT_S)
    object_path = manager.LoadUnit(unit, timeout=CALL_TIMEOUT_S)
    if _get(bus, object_path, "LoadState") != "loaded":
        return "not-found"
    state = _get(bus, object_path, "ActiveState")
    if state != "active":
        manager.StartUnit(unit, "replace", timeout=CALL_TIMEOUT_S)
    # Without a GLib main loop in this worker thread there is no signal delivery, so the job's
    # end is observed by reading ActiveState until it settles or the deadline passes.
    while state not in ("active", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        state = _get(bus, object_path, "ActiveState")
    return state


def ensure_mounted(path: Path, read_mounts: Callable[[], Sequence[Mount]], *,
                   bus_address: str | None = None, timeout_s: float = 30.0,
                   name: str | None = None) -> Check:
    """Check that `path` is a mount point; if not, have systemd start its mount unit and re-check.

    `bus_address` None means the system bus; tests pass another bus's address."""
    name = name or f"mount {path}"
    if is_mount_point(path, read_mounts()):
        return ok(name, f"{path} is mounted", path=str(path))
    unit = mount_unit(path)
    deadline = time.monotonic() + timeout_s
    pydbus = _pydbus()  # imported in this thread: warnings filters are not thread-safe
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mi50d-mountunit")
    try:
        future = pool.submit(_start_and_wait, pydbus, unit, bus_address, deadline)
        state = future.result(timeout_s + 1)
    except concurrent.futures.TimeoutError:
        return fail(name, f"{path} is not mounted and systemd did not answer within "
                    f"{timeout_s:.0f} s", f"systemctl start {unit}; journalctl -u {unit}",
                    unit=unit)
    except Exception as exc:  # GLib.Error and friends: the bus or systemd is not there
        return fail(name, f"{path} is not mounted and systemd cannot be asked over D-Bus "
                    f"({_short(exc)})", f"mount it (systemctl start {unit}, or mount {path})",
                    unit=unit)
    finally:
        pool.shutdown(wait=False)
    if state == "not-found":
        return fail(name, f"{path} is not mounted and systemd has no {unit}",
                    f"add {path} to /etc/fstab (nofail for removable disks) and run "
                    "systemctl daemon-reload", unit=unit)
    if state == "active" and is_mount_point(path, read_mounts()):
        return ok(name, f"{path} mounted by starting {unit}", path=str(path), unit=unit,
                  started=True)
    return fail(name, f"{path} is not mounted: {unit} is {state}",
                f"journalctl -u {unit} (the disk may be absent or its fstab line wrong)",
                unit=unit, state=state)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]
