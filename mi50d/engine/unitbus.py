"""systemd's manager over D-Bus (pydbus), for instances run as transient units `mi50d@NAME.service`.

Blocking calls, made from worker threads (`asyncio.to_thread`); GDBus connections are
thread-safe. What a unit was launched with is recorded in its Description as a digest of the
argv, the environment, the account and the binary's identity (`launch_digest`), so adoption
compares exactly and without a file to keep in step with the unit.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mi50d.host.accounts import Account

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
JOB_IFACE = "org.freedesktop.systemd1.Job"
UNIT_PREFIX = "mi50d@"
UNIT_SUFFIX = ".service"
DAEMON_UNIT = "mi50d.service"
CALL_TIMEOUT_S = 25
INFINITY = 2**64 - 1
EPERM = 1
# Set by systemd for each invocation of mi50d.service (or of the instance unit itself): never
# part of an instance's launch, or every restart of mi50d would look like a change.
PER_INVOCATION_VARS = frozenset({
    "INVOCATION_ID", "JOURNAL_STREAM", "SYSTEMD_EXEC_PID", "MANAGERPID", "MAINPID",
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
    "LISTEN_FDNAMES", "MONITOR_SERVICE_RESULT", "MONITOR_EXIT_CODE", "MONITOR_EXIT_STATUS",
    "MONITOR_INVOCATION_ID", "MONITOR_UNIT", "RUNTIME_DIRECTORY", "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY", "SYSTEMD_NSS_DYNAMIC_BYPASS",
})
DIGEST_MARK = "launch "


def unit_name(instance: str) -> str:
    """`mi50d@NAME.service`; instance names ([a-z0-9._-]) need no escaping."""
    return f"{UNIT_PREFIX}{instance}{UNIT_SUFFIX}"


def instance_of(unit: str) -> str | None:
    if unit.startswith(UNIT_PREFIX) and unit.endswith(UNIT_SUFFIX):
        return unit[len(UNIT_PREFIX):-len(UNIT_SUFFIX)] or None
    return None


def unit_environment(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in PER_INVOCATION_VARS}


def binary_identity(path: str) -> list[object]:
    """What tells one build of the binary from another at the same path (an upgrade in place)."""
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def launch_digest(argv: Sequence[str], env: Mapping[str, str], account: Account | None,
                  allow: Sequence[str] = ()) -> str:
    record: dict[str, object] = {
        "argv": list(argv),
        "env": sorted(unit_environment(env).items()),
        "account": None if account is None else
        [account.name, account.uid, account.gid, list(account.groups), account.home],
        "binary": binary_identity(argv[0]) if argv else None,
    }
    if allow:  # absent otherwise, so units started before allow existed are still adopted
        record["allow"] = list(allow)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def description(instance: str, digest: str) -> str:
    return f"mi50d instance {instance} ({DIGEST_MARK}{digest})"


def digest_of(desc: str) -> str | None:
    head, mark, tail = desc.rpartition(f"({DIGEST_MARK}")
    if not (mark and head and tail.endswith(")")):
        return None
    return tail[:-1] or None


@dataclass(frozen=True)
class UnitState:
    """What adoption and the exit watch read of one unit."""

    name: str
    active: str  # ActiveState: active, activating, deactivating, inactive, failed
    sub: str
    digest: str | None
    main_pid: int
    started_usec: int  # ExecMainStartTimestampMonotonic (CLOCK_MONOTONIC)
    exited_usec: int  # ExecMainExitTimestampMonotonic; 0 while it runs
    exit_code: int  # ExecMainCode: CLD_EXITED 1, CLD_KILLED 2, CLD_DUMPED 3
    exit_status: int
    invocation: str
    result: str
    job: str = ""  # the type of the job systemd runs on the unit now ("start", ...), or ""


def _pydbus() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)
        import pydbus
    return pydbus


def _variant(signature: str, value: object) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)
        from gi.repository import GLib
    return GLib.Variant(signature, value)


def transient_properties(instance: str, digest: str, argv: Sequence[str],
                         env: Mapping[str, str], account: Account | None, cwd: str,
                         stop_timeout_s: float, allow: Sequence[str] = (),
                         writable: Sequence[str] = (),
                         guard: tuple[Sequence[str], Sequence[str]] | None = None
                         ) -> list[tuple[str, Any]]:
    """The unit: llama-server as the instance's account, in the journal, sandboxed as mi50d.service
    itself is (README, "Instances as systemd units", lists what differs and why). `guard`: the
    argv run with full privileges before the start and after the stop (an rpc-worker's
    nftables table, `host.firewall.unit_commands`)."""
    v = _variant
    props: list[tuple[str, Any]] = [
        ("Description", v("s", description(instance, digest))),
        ("Type", v("s", "exec")),
        ("ExecStart", v("a(sasb)", [(argv[0], list(argv), False)])),
        ("Environment", v("as", [f"{k}={val}" for k, val in unit_environment(env).items()])),
        ("WorkingDirectory", v("s", cwd)),
        ("StandardInput", v("s", "null")),
        ("StandardOutput", v("s", "journal")),
        ("StandardError", v("s", "journal")),
        ("KillMode", v("s", "mixed")),
        ("TimeoutStopUSec", v("t", int(stop_timeout_s * 1_000_000))),
        ("Restart", v("s", "no")),  # mi50d's restart policy decides, as for direct children
        # `systemctl stop mi50d 'mi50d@*'`: mi50d first (stop order is the reverse of start
        # order), so it cannot restart an instance that is being stopped.
        ("Before", v("as", [DAEMON_UNIT])),
        ("AddRef", v("b", True)),  # kept (not garbage-collected) until mi50d read its exit
        ("LimitMEMLOCK", v("t", INFINITY)),
        ("LimitMEMLOCKSoft", v("t", INFINITY)),
        ("CapabilityBoundingSet", v("t", 0)),
        ("NoNewPrivileges", v("b", True)),
        ("DevicePolicy", v("s", "closed")),
        ("DeviceAllow", v("a(ss)", [("/dev/kfd", "rw"), ("char-drm", "rw")])),
        ("ProtectSystem", v("s", "strict")),
        ("ProtectHome", v("s", "read-only")),
        ("PrivateTmp", v("b", True)),
        ("PrivateIPC", v("b", True)),
        ("UMask", v("u", 0o027)),
        ("ProtectKernelTunables", v("b", True)),
        ("ProtectKernelModules", v("b", True)),
        ("ProtectKernelLogs", v("b", True)),
        ("ProtectControlGroups", v("b", True)),
        ("ProtectClock", v("b", True)),
        ("ProtectHostname", v("b", True)),
        ("LockPersonality", v("b", True)),
        ("RestrictRealtime", v("b", True)),
        ("RestrictSUIDSGID", v("b", True)),
        ("RestrictNamespaces", v("t", 0)),  # the namespaces allowed: none
        ("RestrictAddressFamilies",
         v("(bas)", (True, ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]))),
        ("SystemCallArchitectures", v("as", ["native"])),
        ("SystemCallFilter", v("(bas)", (True, ["@system-service"]))),
        ("SystemCallErrorNumber", v("i", EPERM)),
    ]
    if account is not None:
        props += [
            ("User", v("s", str(account.uid))),
            ("Group", v("s", str(account.gid))),
            ("SupplementaryGroups", v("as", [str(g) for g in account.groups if g != account.gid])),
        ]
    paths = [f"-{account.home}"] if account is not None and account.home not in ("", "/") else []
    if paths or writable:  # ROCm's and HIP's caches live under HOME; an RPC worker's cache
        props.append(("ReadWritePaths", v("as", [*paths, *writable])))
    if guard is not None:  # "+" in a unit file: root, outside the sandbox; no $ expansion
        pre, post = guard
        props += [("ExecStartPreEx", v("a(sasas)", [(pre[0], list(pre),
                                                      ["privileged", "no-env-expand"])])),
                  ("ExecStopPostEx", v("a(sasas)", [(post[0], list(post),
                                                     ["privileged", "no-env-expand",
                                                      "ignore-failure"])]))]
    if allow:
        props += [("IPAddressAllow", v("a(iayu)", [ip_prefix(a) for a in allow])),
                  ("IPAddressDeny", v("a(iayu)", [(socket.AF_INET, [0] * 4, 0),
                                                  (socket.AF_INET6, [0] * 16, 0)]))]
    return props


def ip_prefix(network: str) -> tuple[int, list[int], int]:
    """"10.0.0.0/24" as systemd's IPAddressAllow= takes it over D-Bus: (family, bytes, prefix)."""
    net = ipaddress.ip_network(network, strict=False)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return family, list(net.network_address.packed), net.prefixlen


class Manager:
    """systemd's manager on the system bus (or `address`, for tests)."""

    def __init__(self, address: str | None = None) -> None:
        pydbus = _pydbus()
        self._bus = pydbus.connect(address) if address else pydbus.SystemBus()
        self._manager = self._bus.get(SYSTEMD, SYSTEMD_PATH, timeout=CALL_TIMEOUT_S)

    def _unit(self, unit: str) -> Any:
        path = self._manager.GetUnit(unit, timeout=CALL_TIMEOUT_S)
        return self._bus.get(SYSTEMD, path, timeout=CALL_TIMEOUT_S)

    def state(self, unit: str) -> UnitState | None:
        """The unit's state, or None when systemd does not have it loaded."""
        try:
            obj = self._unit(unit)
        except Exception as exc:
            if "NoSuchUnit" in str(exc):
                return None
            raise
        u = obj[PROPS_IFACE].GetAll(UNIT_IFACE, timeout=CALL_TIMEOUT_S)
        s = obj[PROPS_IFACE].GetAll(SERVICE_IFACE, timeout=CALL_TIMEOUT_S)
        return UnitState(
            name=unit, active=u["ActiveState"], sub=u["SubState"],
            digest=digest_of(u["Description"]), main_pid=int(s["MainPID"]),
            started_usec=int(s["ExecMainStartTimestampMonotonic"]),
            exited_usec=int(s["ExecMainExitTimestampMonotonic"]),
            exit_code=int(s["ExecMainCode"]), exit_status=int(s["ExecMainStatus"]),
            invocation=bytes(u["InvocationID"]).hex(), result=str(s["Result"]),
            job=self._job_type(u["Job"]),
        )

    def _job_type(self, job: Any) -> str:
        job_id, path = job
        if not job_id:
            return ""
        try:
            return str(self._bus.get(SYSTEMD, path, timeout=CALL_TIMEOUT_S)[JOB_IFACE].JobType)
        except Exception:  # the job ended meanwhile
            return ""

    def instance_units(self) -> list[str]:
        """Every loaded `mi50d@*.service`, whatever its state."""
        units = self._manager.ListUnitsByPatterns([], [f"{UNIT_PREFIX}*{UNIT_SUFFIX}"],
                                                  timeout=CALL_TIMEOUT_S)
        return sorted(str(u[0]) for u in units)

    def start(self, unit: str, properties: list[tuple[str, Any]]) -> None:
        self._manager.StartTransientUnit(unit, "fail", properties, [], timeout=CALL_TIMEOUT_S)

    def stop(self, unit: str) -> None:
        self._manager.StopUnit(unit, "replace", timeout=CALL_TIMEOUT_S)

    def kill(self, unit: str, sig: int) -> None:
        self._manager.KillUnit(unit, "all", sig, timeout=CALL_TIMEOUT_S)

    def reset_failed(self, unit: str) -> None:
        try:
            self._manager.ResetFailedUnit(unit, timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            if "NoSuchUnit" not in str(exc):
                raise

    def ref(self, unit: str) -> None:
        """Keep the unit loaded (with its exit status) while this connection lives."""
        self._unit(unit)[UNIT_IFACE].Ref(timeout=CALL_TIMEOUT_S)

    def unref(self, unit: str) -> None:
        try:
            self._unit(unit)[UNIT_IFACE].Unref(timeout=CALL_TIMEOUT_S)
        except Exception as exc:
            if "NoSuchUnit" not in str(exc) and "NotReferenced" not in str(exc):
                raise
