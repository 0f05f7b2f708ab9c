"""Preflight: everything the seed guide's troubleshooting made people check by hand, checked
before every launch of an instance, each result one line with its fix.

`run_preflight` returns a list of `Check`s and never raises; the supervisor runs it in a worker
thread (it reads files, starts short children and may wait on systemd) and refuses to start the
instance if any check failed. Access is checked as the account the instance runs as
(`mi50d.host.access`). The order matters: required mounts come first, since starting a mount unit
can make a "missing" model appear.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mi50d.config import DaemonConfig, InstanceConfig
from mi50d.host import gpus as gpumod
from mi50d.host import rocm
from mi50d.host.access import account_name
from mi50d.host.accounts import Account
from mi50d.host.checks import Check, fail, ok, skip, warn
from mi50d.host.diagnose import diagnose
from mi50d.host.files import file_problem
from mi50d.host.ggufmeta import GGUFError, GGUFInfo, read_gguf
from mi50d.host.mmproj import projector_check
from mi50d.host.mounts import MountinfoError, foreign_hint, mount_of, noexec_fix, read_mounts
from mi50d.host.mountunits import ensure_mounted
from mi50d.host.preflightcache import cached_access, cached_run, device_files, runtime_files
from mi50d.host.rpcpreflight import enforcement_check, worker_version_check, workers_check
from mi50d.host.vram import check_fit, estimate

VERSION_TIMEOUT_S = 30.0
DEVICES_TIMEOUT_S = 60.0
TENSILE_DROPPED = (6, 4)  # the first ROCm whose rocBLAS ships no gfx906 Tensile files
MAX_DEVICE_LINE = 512  # a device line is ~60 characters; longer ones are not parsed
_DEVICE_LINE = re.compile(r"^\s+(?P<name>\S+): (?P<desc>.*?) \((?P<total>\d+) MiB, "
                          r"(?P<free>\d+) MiB free\)")


@dataclass(frozen=True)
class Other:
    """Another instance as the supervisor knows it now: its address, and the VRAM it holds per
    GPU index (measured from its log, or estimated while it loads; empty when not running)."""

    name: str
    host: str
    port: int
    running: bool = False
    vram: Mapping[int, int] = field(default_factory=dict)


def expects_gpu(inst: InstanceConfig) -> bool:
    """`n_gpu_layers = 0` is the explicit choice to run on the CPU; anything else wants GPUs.
    An rpc-worker wants GPUs when it lists them, and so does an instance split over RPC workers
    (its layers may all go to the workers' devices)."""
    if inst.is_worker or inst.rpc:
        return inst.gpus is not None
    return inst.n_gpu_layers != 0


def run_preflight(inst: InstanceConfig, daemon: DaemonConfig, account: Account | None,
                  others: Sequence[Other] = (), *, bus_address: str | None = None,
                  run_binary: bool = True, units: bool = False) -> list[Check]:
    """All checks for starting `inst` as `account` (None: as this process) next to `others`;
    `units`: whether it would run as a systemd unit (which enforces an rpc-worker's allow)."""
    checks = [ensure_mounted(p, lambda: read_mounts(daemon.host.mountinfo),
                             bus_address=bus_address, name=f"mount {p}")
              for p in inst.requires_mounts]
    checks += _binary(inst, daemon, account, run_binary)
    if inst.is_worker:
        return [*checks, *_worker(inst, daemon, account, others, run_binary, units)]
    if inst.rpc and run_binary:
        checks.append(workers_check(inst, daemon))
    assert inst.model is not None  # config: a llama-server instance has one
    model_check, model = _gguf(inst.model, "model", daemon, account, want_mmproj=False)
    checks.append(model_check)
    mmproj_size = 0
    if inst.mmproj is not None:
        mmproj_check, mmproj = _gguf(inst.mmproj, "mmproj", daemon, account, want_mmproj=True)
        checks.append(mmproj_check)
        mmproj_size = mmproj.file_size if mmproj else 0
        if model is not None and mmproj is not None:
            checks.append(projector_check(model, mmproj, inst.mmproj))
    if inst.api_key_file is not None:
        checks.append(_key_file(inst.api_key_file, account))
    checks.append(_port(inst, account, others))
    selected: list[gpumod.Gpu] = []
    if expects_gpu(inst):
        gpu_check, selected = _gpus(inst, daemon)
        checks.append(gpu_check)
        if selected:
            checks.append(device_access_check(selected, daemon, account))
            checks.append(_rocblas(selected, daemon, inst.environment(os.environ)))
    if selected and model is not None:
        try:
            est = estimate(inst, model, mmproj_size, n_gpus=len(selected))
        except GGUFError as exc:
            checks.append(fail("vram", f"{inst.model}: {exc}", "download or copy it again"))
        else:
            held = {o.name: o.vram for o in others if o.name != inst.name and o.vram}
            checks.append(check_fit(est, selected, held, force=inst.force_vram))
    return checks


def _worker(inst: InstanceConfig, daemon: DaemonConfig, account: Account | None,
            others: Sequence[Other], run_binary: bool, units: bool) -> list[Check]:
    checks = [enforcement_check(inst, units), _port(inst, account, others)]
    if run_binary and not any(c.failed for c in checks):
        checks.append(worker_version_check(inst, daemon))
    if inst.gpus is not None:
        gpu_check, selected = _gpus(inst, daemon)
        checks.append(gpu_check)
        if selected:
            checks.append(device_access_check(selected, daemon, account))
            checks.append(_rocblas(selected, daemon, inst.environment(os.environ)))
    return checks


def _mount_note(path: Path, daemon: DaemonConfig) -> tuple[bool, str | None]:
    """(noexec?, the remount fix) for the mount holding `path`."""
    try:
        m = mount_of(path, read_mounts(daemon.host.mountinfo))
    except (OSError, MountinfoError):
        return False, None
    return m.noexec, noexec_fix(m) if m.noexec else None


def _binary(inst: InstanceConfig, daemon: DaemonConfig, account: Account | None,
            run_binary: bool) -> list[Check]:
    binary = inst.binary(daemon)
    user = account_name(account)
    key, what = (("rpc_server", "the RPC server executable") if inst.is_worker
                 else ("llama_server", "the llama-server executable"))
    problem = file_problem(binary, key, what,
                           "build it with mi50ctl build-llama, or set llama_server in mi50d.toml",
                           account_name(None))
    if problem:
        return [fail("binary", problem.message, problem.fix)]
    noexec, fix = _mount_note(binary, daemon)
    if noexec:
        return [fail("binary", f"{binary} is on a noexec mount", fix)]
    (denied,) = cached_access(account, [(binary, "x")])
    if denied:
        return [fail("binary", f"{user} cannot execute {binary}: {denied}",
                     f"chmod 755 {binary} and make its directories searchable (o+x) for {user}")]
    if not run_binary or inst.is_worker:  # an RPC server has no --version (_worker asks it)
        return [ok("binary", f"{binary} is executable by {user}")]
    env = inst.environment(os.environ)
    version = cached_run(account, [str(binary), "--version"], env, VERSION_TIMEOUT_S,
                         runtime_files(binary))
    if not version.ok:
        known = diagnose(version.output.splitlines())
        return [fail("binary", f"{binary} --version failed: {version.last_line()}",
                     known[0].fix if known else f"run {binary} --version as {user} to see why")]
    first = (version.output.strip().splitlines() or ["(no output)"])[0][:200]
    checks = [ok("binary", f"{binary} runs: {first}", version=version.output.strip()[:4096])]
    if expects_gpu(inst):
        checks.append(_listed_devices(inst, daemon, account, binary, env))
    return checks


def parse_devices(output: str) -> list[dict[str, object]]:
    """`llama-server --list-devices` lines like "  ROCm0: AMD Instinct MI50/MI60 (16368 MiB,
    16348 MiB free)" as dicts; [] for "(none)"."""
    found: list[dict[str, object]] = []
    for line in output.splitlines():
        m = _DEVICE_LINE.match(line) if len(line) <= MAX_DEVICE_LINE else None
        if m:
            found.append({"name": m["name"], "description": m["desc"],
                          "total_mib": int(m["total"]), "free_mib": int(m["free"])})
    return found


def _listed_devices(inst: InstanceConfig, daemon: DaemonConfig, account: Account | None,
                    binary: Path, env: Mapping[str, str]) -> Check:
    done = cached_run(account, [str(binary), "--list-devices"], env, DEVICES_TIMEOUT_S,
                      [*runtime_files(binary), *device_files(daemon.host)])
    devices = parse_devices(done.output)
    wanted = len(inst.gpus) if inst.gpus is not None else len(gpumod.list_gpus(daemon.host))
    if not done.ok:
        return fail("devices", f"{binary} --list-devices failed: {done.last_line()}",
                    "run it by hand to see why; mi50ctl doctor checks the host")
    if not devices:
        return _no_devices(binary, done.output, account)
    if len(devices) < wanted:
        return fail("devices", f"llama-server sees {len(devices)} of the {wanted} GPUs asked for",
                    "check device access (mi50ctl doctor) and the instance's gpus",
                    devices=devices)
    names = ", ".join(str(d["name"]) for d in devices)
    return ok("devices", f"llama-server sees {names}", devices=devices)


def _no_devices(binary: Path, output: str, account: Account | None) -> Check:
    """A HIP build that sees no GPU needs the host fixed; a CPU build needs rebuilding."""
    backend = rocm.build_backend(binary, output)
    cpu = "set n_gpu_layers = 0 to run on the CPU on purpose"
    if backend == "hip":
        why = rocm.rocm_init_failure(output) or "no ROCm device visible"
        return fail("devices", f"{binary} is a HIP build but sees no GPU ({why}): it would run "
                    "on the CPU", f"check that {account_name(account)} can use the GPUs "
                    "(mi50ctl doctor: amdgpu driver, /dev/kfd, device access) and the instance's "
                    f"gpus / ROCR_VISIBLE_DEVICES; or {cpu}", devices=[], backend=backend)
    what = (f"a {backend} build, without HIP" if backend is not None
            else "a CPU-only build, or no ROCm device visible")
    return fail("devices", f"{binary} sees no GPU ({what}): it would run on the CPU",
                f"build with HIP: mi50ctl build-llama --targets gfx906; or {cpu}", devices=[],
                backend=backend)


def _gguf(path: Path, name: str, daemon: DaemonConfig, account: Account | None,
          want_mmproj: bool) -> tuple[Check, GGUFInfo | None]:
    user = account_name(account)
    problem = file_problem(path, name, "the .gguf file", "fix the path; if it is on a disk "
                           "that mounts late, add requires_mounts = [\"/its/mount/point\"]",
                           account_name(None))
    if problem:
        return fail(name, problem.message, problem.fix), None
    (denied,) = cached_access(account, [(path, "r")])
    if denied:
        return fail(name, f"{user} cannot read {path}: {denied}",
                    _read_fix(path, account, daemon)), None
    try:
        info = read_gguf(path)
    except GGUFError as exc:
        return fail(name, f"{path}: {exc}", "download or copy it again"), None
    except OSError as exc:
        return fail(name, f"{path}: {exc.strerror}", "check the disk (dmesg)"), None
    if info.is_mmproj and not want_mmproj:
        return fail(name, f"{path} is an mmproj (vision projector), not a model",
                    "swap model and mmproj in the instance file"), None
    if want_mmproj and not info.is_mmproj:
        return fail(name, f"{path} is a model ({info.architecture}), not an mmproj",
                    "swap model and mmproj in the instance file"), None
    kind = "mmproj" if info.is_mmproj else info.architecture
    return ok(name, f"{path.name}: GGUF v{info.version} {kind}, {len(info.tensors)} tensors, "
              "complete", size=info.file_size), info


def _key_file(path: Path, account: Account | None) -> Check:
    """llama-server reads api_key_file at start and exits if it cannot."""
    problem = file_problem(path, "api_key_file", "a file with one key per line",
                           "create it (one key per line) or remove api_key_file",
                           account_name(None))
    if problem:
        return fail("api key file", problem.message, problem.fix)
    (denied,) = cached_access(account, [(path, "r")])
    if denied:
        user = account_name(account)
        return fail("api key file", f"{user} cannot read {path}: {denied}",
                    f"chgrp the file to a group of {user} and chmod 640 it")
    return ok("api key file", f"{path} is readable")


def _read_fix(path: Path, account: Account | None, daemon: DaemonConfig) -> str:
    uid = account.uid if account else os.getuid()
    gid = account.gid if account else os.getgid()
    try:
        st = path.stat()
        m = mount_of(path, read_mounts(daemon.host.mountinfo))
    except (OSError, MountinfoError):
        return f"make it readable: chmod o+r {path}"
    return foreign_hint(m, uid, gid, st) or (
        f"chgrp {gid} {path} && chmod g+r {path} (or chmod o+r), and make each directory "
        f"above it searchable (o+x)")


def _port(inst: InstanceConfig, account: Account | None, others: Sequence[Other]) -> Check:
    for o in others:
        if o.name != inst.name and o.port == inst.port:
            state = "running" if o.running else "configured"
            return fail("port", f"port {inst.port} belongs to instance {o.name} ({state})",
                        "give one of them another port")
    uid = account.uid if account else os.geteuid()
    lowest = _unprivileged_port_start()
    if inst.port < lowest and uid != 0:
        return fail("port", f"port {inst.port} is below {lowest}: only root may bind it",
                    f"use a port >= {lowest}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            inst.host, inst.port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            # as llama-server's HTTP library does: only a listener blocks, not TIME_WAIT
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except socket.gaierror as exc:
        return fail("port", f"host {inst.host!r} does not resolve: {exc.strerror}",
                    "set host to an address of this machine, e.g. 127.0.0.1")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return fail("port", f"port {inst.port} on {inst.host} is in use by another process",
                        f"ss -ltnp 'sport = :{inst.port}' shows which; stop it or change port")
        return fail("port", f"cannot bind {inst.host}:{inst.port}: {exc.strerror}",
                    "set host to an address of this machine")
    return ok("port", f"{inst.host}:{inst.port} is free")


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _gpus(inst: InstanceConfig, daemon: DaemonConfig) -> tuple[Check, list[gpumod.Gpu]]:
    found = gpumod.list_gpus(daemon.host)
    if not found:
        return fail("gpus", "no GPU in the KFD topology (amdgpu driver not loaded?)",
                    "check dmesg | grep amdgpu and modprobe amdgpu; or set n_gpu_layers = 0 "
                    "to run on the CPU"), []
    wanted = list(inst.gpus) if inst.gpus is not None else [g.index for g in found]
    missing = [i for i in wanted if i >= len(found)]
    if missing:
        return fail("gpus", f"gpus = {wanted} but this host has GPUs 0-{len(found) - 1}",
                    "use indices from mi50ctl doctor's GPU list"), []
    selected = [found[i] for i in wanted]
    desc = ", ".join(f"GPU {g.index} {g.gfx}" for g in selected)
    other = [g for g in selected if not g.is_mi50]
    if other:
        g = other[0]
        return warn("gpus", f"{desc}: GPU {g.index} is {g.gfx}, not an MI50 (gfx906)",
                    f"make sure the build includes {g.gfx}: mi50ctl build-llama --targets "
                    f"gfx906,{g.gfx}"), selected
    return ok("gpus", desc), selected


def device_access_check(selected: Sequence[gpumod.Gpu], daemon: DaemonConfig,
                   account: Account | None) -> Check:
    user = account_name(account)
    nodes = [daemon.host.dev_root / "kfd", *(g.render_node for g in selected)]
    for node in nodes:
        try:
            os.stat(node)
        except FileNotFoundError:
            return fail("device access", f"{node} does not exist",
                        "load the amdgpu driver (modprobe amdgpu) and check dmesg")
        except OSError as exc:
            return fail("device access", f"{node}: {exc.strerror}",
                        "check the device nodes and host.dev_root in mi50d.toml")
    denied = [(n, e) for n, e in zip(nodes, cached_access(account, [(n, "rw") for n in nodes]),
                                     strict=True) if e]
    if denied:
        node, why = denied[0]
        try:
            st = node.stat()
            mode = f"; mode {stat.filemode(st.st_mode)} gid {st.st_gid}"
        except OSError:
            mode = ""
        return fail("device access", f"{user} cannot open {node} ({why}{mode})",
                    f"usermod -aG render,video {user}, and a udev rule giving {node.name} "
                    "group render mode 0660")
    return ok("device access", f"{user} can open {', '.join(str(n) for n in nodes)}")


def _rocblas(selected: Sequence[gpumod.Gpu], daemon: DaemonConfig,
             env: Mapping[str, str]) -> Check:
    if not any(g.is_mi50 for g in selected):
        return skip("rocblas", "no gfx906 GPU selected")
    return rocblas_check(daemon, env)


def rocblas_check(daemon: DaemonConfig, env: Mapping[str, str] | None = None) -> Check:
    """rocBLAS's gfx906 Tensile files, where rocBLAS will look for them (`mi50d.host.rocm`):
    AMD's ROCm >= 6.4 dropped them, and a HIP llama-server then aborts with "Cannot read
    TensileLibrary.dat" at its first matrix multiply. `env` is the instance's environment (for
    ROCBLAS_TENSILE_LIBPATH); None means this process's."""
    env = os.environ if env is None else env
    found = rocm.find_rocm(daemon.host.rocm_path, env)
    library = rocm.tensile_library(found, env)
    if library is None:
        return fail("rocblas", f"no ROCm at {daemon.host.rocm_path} (nor in /usr, nor hipconfig "
                    "on PATH)", "install ROCm 7.x (amdgpu-install --usecase=rocm, or the "
                    "distribution's librocblas5), or set host.rocm_path in mi50d.toml")
    what = found.describe() if found else f"{rocm.TENSILE_ENV}={library.path}"
    if library.files:
        return ok("rocblas", f"{len(library.files)} gfx906 Tensile files in {library.path} "
                  f"({what})", library=str(library.path), files=len(library.files))
    abort = "llama-server would abort with \"Cannot read TensileLibrary.dat\""
    if library.reason == rocm.TENSILE_ENV:
        return fail("rocblas", f"{rocm.TENSILE_ENV}={library.path} has no gfx906 Tensile files "
                    f"(rocBLAS reads only that directory): {abort}",
                    "point it at a directory holding *gfx906* Tensile files, or unset it")
    version = found.version.parts if found and found.version else None
    shown = str(found.version) if found and found.version else "unknown"
    dropped = (" (ROCm >= 6.4 ships none)" if found and found.layout == "amd" and version
               and version >= TENSILE_DROPPED else "")
    where = "" if library.path.is_dir() else f" ({library.path} does not exist)"
    return fail("rocblas", f"rocBLAS in ROCm {shown} has no gfx906 Tensile files{dropped}"
                f"{where}: {abort}",
                "mi50ctl tensile install PACKAGE_OR_DIR"
                + (f" --rocm-path {found.prefix}" if found else "")
                + " (a rocBLAS package built for gfx906, e.g. Debian's librocblas5 .deb)",
                library=str(library.path))
