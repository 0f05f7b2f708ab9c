"""`mi50ctl doctor`: the host checklist (in the spirit of `flutter doctor`) plus every instance's
preflight, without needing the daemon.

Host: ROCm version, the GPUs' gfx targets from KFD (cross-checked with `rocminfo` when ROCm has
it), hipcc/hipconfig, device access for the service account, rocBLAS's gfx906 Tensile files, the
llama-server build (HIP or CPU, its targets and version, from the build.json `mi50ctl build-llama`
writes next to it, else from `--version` / `--list-devices`), and the daemon's control socket.
This module owns assembling those checks into a `Report`; rendering is the CLI's job.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mi50d.config import ConfigError, DaemonConfig, load_config, load_daemon_config
from mi50d.host import gpus as gpumod
from mi50d.host import kfd, rocm
from mi50d.host.access import account_name, run_as
from mi50d.host.accounts import Account, AccountError, resolve_account
from mi50d.host.checks import Check, fail, ok, skip, warn
from mi50d.host.preflight import (
    Other,
    device_access_check,
    expects_gpu,
    parse_devices,
    rocblas_check,
    run_preflight,
)
from mi50d.host.rocm import read_build as read_build  # moved there (preflight needs it too)
from mi50d.host.vram import gib

SOCKET_TIMEOUT_S = 2.0
TOOL_TIMEOUT_S = 60.0


class UnknownInstance(Exception):
    pass


@dataclass(frozen=True)
class Report:
    host: list[Check]
    instances: dict[str, list[Check]] = field(default_factory=dict)

    def all(self) -> list[Check]:
        return self.host + [c for checks in self.instances.values() for c in checks]

    @property
    def failed(self) -> bool:
        return any(c.failed for c in self.all())

    def to_json(self) -> dict[str, Any]:
        return {"ok": not self.failed, "host": [c.to_json() for c in self.host],
                "instances": {n: [c.to_json() for c in cs] for n, cs in self.instances.items()}}


def _account(daemon: DaemonConfig) -> tuple[Check, Account | None]:
    try:
        account = resolve_account(daemon.user)
    except AccountError as exc:
        return fail("account", str(exc).split(";")[0], str(exc).partition("; ")[2] or None), None
    name = account_name(account)
    how = "as configured" if account else "this process's own account (not root)"
    return ok("account", f"instances run as {name} ({how})"), account


# Host checks that matter only to instances that use GPUs.
GPU_CHECKS = frozenset({"rocm", "gpus", "rocminfo", "device access", "rocblas"})


def host_checks(daemon: DaemonConfig, account: Account | None,
                needs_gpu: bool = True, socket_path: Path | None = None) -> list[Check]:
    """The host's checks. With `needs_gpu` False (every configured instance runs on the CPU:
    n_gpu_layers = 0) a failed GPU check is reported as a skip saying so: a CPU host is not
    broken for lacking ROCm."""
    checks = _host_checks(daemon, account, socket_path)
    if needs_gpu:
        return checks
    return [skip(c.name, f"{c.message} (not needed: every instance runs on the CPU)")
            if c.failed and c.name in GPU_CHECKS else c for c in checks]


def _host_checks(daemon: DaemonConfig, account: Account | None,
                 socket_path: Path | None = None) -> list[Check]:
    host = daemon.host
    installed = rocm.find_rocm(host.rocm_path, os.environ)
    checks = [_rocm(installed, host.rocm_path)]
    found = gpumod.list_gpus(host)
    targets = kfd.gfx_targets(host.sysfs_root)
    if not found:
        checks.append(fail("gpus", "no GPU in the KFD topology (amdgpu driver not loaded?)",
                           "dmesg | grep amdgpu; modprobe amdgpu"))
    else:
        checks.append((ok if "gfx906" in targets else warn)(
            "gpus", f"{len(found)} GPU(s): {', '.join(targets)}",
            *([] if "gfx906" in targets else ["mi50d is made for MI50 (gfx906) GPUs"]),
        ))
        checks += [ok(f"gpu {g.index}", _describe(g), **g.to_json()) for g in found]
        checks.append(_rocminfo(installed, targets))
        checks.append(device_access_check(found, daemon, account))
        if "gfx906" in targets:
            checks.append(rocblas_check(daemon))
    checks.append(_hip_tools(installed))
    checks.append(_build(daemon, account, expect_gpu=bool(found)))
    checks.append(socket_check(socket_path or daemon.socket, daemon.socket_group))
    return checks


def _describe(g: gpumod.Gpu) -> str:
    parts = [g.gfx, g.pci_address or f"node {g.node}"]
    if g.vram_total is not None and g.vram_used is not None:
        parts.append(f"VRAM {gib(g.vram_used)} / {gib(g.vram_total)}")
    if g.temperatures_c:
        parts.append(", ".join(f"{k} {v:.0f} °C" for k, v in g.temperatures_c.items()))
    if g.power_w is not None:
        parts.append(f"{g.power_w:.0f} W")
    if g.busy_percent is not None:
        parts.append(f"{g.busy_percent}% busy")
    return "; ".join(parts)


def _rocm(found: rocm.Rocm | None, configured: Path) -> Check:
    if found is None:
        return fail("rocm", f"no ROCm at {configured} (no .info/version), nor distribution "
                    "packages in /usr, nor hipconfig on PATH",
                    "install ROCm 7.x, or set host.rocm_path in mi50d.toml")
    data = {"prefix": str(found.prefix), "layout": found.layout,
            "version": str(found.version) if found.version else None}
    if found.version is None:
        return warn("rocm", found.describe(), "install librocm-core-dev (or set "
                    "host.rocm_path to an AMD ROCm tree with .info/version)", **data)
    return ok("rocm", found.describe(), **data)


def _rocminfo(found: rocm.Rocm | None, targets: list[str]) -> Check:
    tool = rocm.find_tools(found, os.environ.get("PATH", ""), ["rocminfo"])["rocminfo"]
    if tool is None:
        return skip("rocminfo", "rocminfo not installed")
    done = run_as(None, [str(tool)], {"PATH": "/usr/bin:/bin"}, TOOL_TIMEOUT_S)
    seen = sorted(set(gpumod.rocminfo_targets(done.output)))
    if not done.ok or seen != targets:
        return warn("rocminfo", f"rocminfo reports {', '.join(seen) or 'no GPU'} but KFD has "
                    f"{', '.join(targets)}", "check /dev/kfd access and dmesg; "
                    "HSA_OVERRIDE_GFX_VERSION=9.0.6 is not needed for an MI50")
    return ok("rocminfo", f"rocminfo agrees: {', '.join(seen)}")


def _hip_tools(found: rocm.Rocm | None) -> Check:
    tools = rocm.find_tools(found, os.environ.get("PATH", ""))
    missing = [t for t, p in tools.items() if p is None]
    where = sorted({str(p.parent) for p in tools.values() if p is not None})
    if missing:
        looked = f"{found.prefix / 'bin'} or on PATH" if found else "on PATH"
        return warn("hip tools", f"{', '.join(missing)} not in {looked}",
                    "install the HIP SDK (rocm-hip-sdk, or Debian's hipcc); needed only to "
                    "build llama-server")
    return ok("hip tools", f"hipcc and hipconfig in {', '.join(where)}")


def _build(daemon: DaemonConfig, account: Account | None, expect_gpu: bool) -> Check:
    binary = daemon.llama_server
    if not binary.is_file():
        return fail("llama-server", f"{binary} does not exist",
                    "mi50ctl build-llama --targets gfx906")
    record = read_build(binary)
    if record is not None:
        backend = str(record.get("backend", "?"))
        targets = [str(t) for t in record.get("targets", []) or []]
        first = str(record.get("version", "")).splitlines()[0:1]
        what = f"{backend} build" + (f" for {','.join(targets)}" if targets else "")
        text = f"{binary}: {what}; {first[0] if first else 'version unknown'}"
        if backend != "hip":
            return (warn if expect_gpu else ok)("llama-server", text + " (CPU only)",
                                                *(["mi50ctl build-llama --targets gfx906"]
                                                  if expect_gpu else []), build=record)
        if "gfx906" not in targets:
            return warn("llama-server", text + ": no gfx906 kernels",
                        "mi50ctl build-llama --targets gfx906", build=record)
        return ok("llama-server", text, build=record)
    version = run_as(account, [str(binary), "--version"], {}, TOOL_TIMEOUT_S)
    if not version.ok:
        return fail("llama-server", f"{binary} --version failed: {version.last_line()}",
                    "mi50ctl build-llama --targets gfx906")
    listed = run_as(account, [str(binary), "--list-devices"], {}, TOOL_TIMEOUT_S).output
    devices = parse_devices(listed)
    text = f"{binary}: {version.output.strip().splitlines()[0]}"
    if not devices and rocm.build_backend(binary, listed) == "hip":
        why = rocm.rocm_init_failure(listed) or "no ROCm device visible"
        return (warn if expect_gpu else ok)("llama-server", f"{text}; a HIP build that sees no "
                                            f"GPU ({why})", *(["check the gpus and device "
                                            "access lines above"] if expect_gpu else []))
    if not devices:
        return (warn if expect_gpu else ok)("llama-server", text + "; sees no GPU",
                                            *(["mi50ctl build-llama --targets gfx906"]
                                              if expect_gpu else []))
    return ok("llama-server", text + f"; sees {', '.join(str(d['name']) for d in devices)}")


def socket_check(path: Path, group: str = "mi50d") -> Check:
    """Whether mi50d answers on its control socket (connect only); `group` is the configured
    socket_group, named in the fix when the socket refuses this user."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return warn("daemon", f"mi50d is not running (no {path})",
                    "systemctl start mi50d (instance checks below work without it)")
    except OSError:
        pass  # e.g. a directory this user cannot search: connect() below says what it is
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(SOCKET_TIMEOUT_S)
            s.connect(str(path))
    except PermissionError:
        return warn("daemon", f"permission denied on {path}",
                    f"join the group {group}: sudo usermod -aG {group} $USER, then log in again")
    except OSError as exc:
        return warn("daemon", f"{path} does not accept connections: {exc.strerror or exc}",
                    "systemctl restart mi50d; journalctl -u mi50d")
    return ok("daemon", f"mi50d answers on {path}")


def run_doctor(config_dir: Path, socket_path: Path | None = None) -> Report:
    """Host checks and every instance's preflight for the configuration in `config_dir`;
    the daemon is looked for at `socket_path` (default: `socket` in its mi50d.toml)."""
    try:
        config = load_config(config_dir)
    except ConfigError as exc:
        try:
            daemon = load_daemon_config(config_dir)
        except ConfigError:
            daemon = DaemonConfig()
        account_check, account = _account(daemon)
        problem = fail("config", exc.problems[0] + (f" (+{len(exc.problems) - 1} more)"
                                                    if len(exc.problems) > 1 else ""),
                       "fix the file; mi50d --check-config lists every problem")
        return Report([problem, account_check,
                       *host_checks(daemon, account, socket_path=socket_path)])
    account_check, account = _account(config.daemon)
    # a host with no instance yet is checked for what the MI50 needs
    needs_gpu = not config.instances or any(expects_gpu(i) for i in config.instances.values())
    host = [ok("config", f"{config_dir}: {len(config.instances)} instance(s)"), account_check,
            *host_checks(config.daemon, account, needs_gpu, socket_path)]
    daemon_up = any(c.name == "daemon" and c.status == "ok" for c in host)
    others = [Other(i.name, i.host, i.port) for i in config.instances.values()]
    instances = {name: _soften_port(run_preflight(inst, config.daemon, account, others),
                                    daemon_up)
                 for name, inst in config.instances.items()}
    return Report(host, instances)


def _soften_port(checks: list[Check], daemon_up: bool) -> list[Check]:
    """With mi50d running, an instance's port is busy because mi50d runs it: not a failure."""
    if not daemon_up:
        return checks
    return [warn(c.name, c.message + " (by this instance, if mi50d runs it)", c.fix)
            if c.name == "port" and c.failed and "another process" in c.message else c
            for c in checks]


def check_instance(config_dir: Path, name: str, socket_path: Path | None = None) -> list[Check]:
    """One instance's preflight, as `mi50ctl check NAME`; raises ConfigError, UnknownInstance.
    The daemon is looked for at `socket_path` (default: `socket` in its mi50d.toml)."""
    config = load_config(config_dir)
    inst = config.instances.get(name)
    if inst is None:
        known = ", ".join(sorted(config.instances)) or "none"
        raise UnknownInstance(f"no instance {name!r} in {config_dir} (known: {known})")
    _, account = _account(config.daemon)
    others = [Other(i.name, i.host, i.port) for i in config.instances.values()]
    return _soften_port(run_preflight(inst, config.daemon, account, others),
                        socket_check(socket_path or config.daemon.socket).status == "ok")
