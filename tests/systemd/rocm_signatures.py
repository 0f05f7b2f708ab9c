"""What the real HIP build and ROCm 7.2 runtime print in the failure cases this machine (no GPU,
no amdgpu driver) can produce, and the fixture files those outputs are recorded in.

Each `Case` is one command in the sid ROCm root against the HIP build (tests/systemd/hip_build.py).
Its output is kept in tests/fixtures/rocm-signatures/<name>.txt with a header:

    # origin: REAL
    # command: <the command, in the root>
    # produced: <ROCm and llama.cpp versions>
    # expect: <diagnosis codes, comma-separated, or "none">

followed by the output with llama.cpp's timestamps removed. Fixtures with `origin: RECORDED`
hold text copied from bug reports, for the cases no machine here can produce (they need a
GPU); tests/test_hip_signatures.py checks both kinds and, when the HIP build is at hand,
re-runs every REAL case and compares.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.systemd import hip_build, rootfs

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rocm-signatures"
BIN = f"{hip_build.BUILD_ROOT_IN_ROOT}/current/bin"
MODEL_DIR_IN_ROOT = "/srv/models"
TENSILE_DIR = "/usr/lib/x86_64-linux-gnu/rocblas/5/library"
# llama.cpp's log prefix "0.00.001.623 E " (time since start): it differs on every run.
_STAMP = re.compile(r"^\d+\.\d+\.\d+\.\d+ ")


@dataclass(frozen=True)
class Case:
    name: str
    about: str
    args: tuple[str, ...]  # after llama-server; "{model}" and "{port}" are filled in
    env: Mapping[str, str] = field(default_factory=dict)
    tmpfs: tuple[str, ...] = ()  # empty directories laid over these paths
    serve: bool = False  # a server: collect its output until it listens, then stop it
    user: str | None = None  # run as this user (setpriv), else root
    dev_kfd: str | None = None  # "mode-000-file": an unreadable file bound at /dev/kfd

    def command(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        extra = "".join(f" [empty {p}]" for p in self.tmpfs)
        if self.dev_kfd:
            extra += f" [/dev/kfd = {self.dev_kfd}]"
        who = f"setpriv --reuid={self.user} ... " if self.user else ""
        return f"{env + ' ' if env else ''}{who}llama-server {' '.join(self.args)}{extra}".strip()


SERVE = ("-m", "{model}", "--host", "127.0.0.1", "--port", "{port}", "-c", "512", "-ngl", "all")
CASES = (
    Case("no-gpu-list-devices", "no GPU (no amdgpu driver, no /dev/kfd)", ("--list-devices",)),
    Case("no-gpu-serve", "no GPU, a start with -ngl all: it serves on the CPU", SERVE, serve=True),
    Case("hip-visible-devices-hidden", "the device hidden from HIP", ("--list-devices",),
         env={"HIP_VISIBLE_DEVICES": "-1"}),
    Case("rocr-visible-devices-hidden", "the device hidden from ROCr", ("--list-devices",),
         env={"ROCR_VISIBLE_DEVICES": "-1"}),
    Case("bad-hsa-override", "an HSA_OVERRIDE_GFX_VERSION that is not a version",
         ("--list-devices",), env={"HSA_OVERRIDE_GFX_VERSION": "banana"}),
    Case("rocblas-tensile-missing", "rocBLAS's Tensile directory empty, a start with -ngl all",
         SERVE, tmpfs=(TENSILE_DIR,), serve=True),
    # Without the amdgpu driver ROCr gives up before it opens /dev/kfd, so this prints the
    # no-device text; the permission signature itself is recorded-kfd-access.txt.
    Case("kfd-permission-denied", "/dev/kfd present but not readable by the service account, "
         "no driver loaded", ("--list-devices",), user="nobody", dev_kfd="mode-000-file"),
)


@dataclass(frozen=True)
class Fixture:
    name: str
    origin: str  # REAL or RECORDED
    command: str
    produced: str
    expect: tuple[str, ...]
    lines: tuple[str, ...]


def parse(path: Path) -> Fixture:
    header: dict[str, str] = {}
    body: list[str] = []
    for line in path.read_text().splitlines():
        if not body and line.startswith("# ") and ":" in line:
            key, _, value = line[2:].partition(":")
            header[key.strip()] = value.strip()
        else:
            body.append(line)
    for key in ("origin", "command", "produced", "expect"):
        if key not in header:
            raise ValueError(f"{path}: no '# {key}:' header line")
    expect = () if header["expect"] == "none" else tuple(
        c.strip() for c in header["expect"].split(","))
    return Fixture(path.stem, header["origin"], header["command"], header["produced"], expect,
                   tuple(body))


def fixtures() -> list[Fixture]:
    return [parse(p) for p in sorted(FIXTURES.glob("*.txt"))]


def write(case: Case, produced: str, expect: list[str], lines: list[str]) -> Path:
    path = FIXTURES / f"{case.name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = ["# origin: REAL", f"# command: {case.command()}  ({case.about})",
            f"# produced: {produced}", f"# expect: {', '.join(expect) or 'none'}"]
    path.write_text("\n".join(head + lines) + "\n")
    return path


def strip_stamps(lines: list[str]) -> list[str]:
    return [_STAMP.sub("", line) for line in lines]


def run(case: Case, hip: hip_build.HipBuild, source: Path, repo: Path, model: Path,
        port: int, scratch: Path) -> list[str]:
    """The case's output (stamps removed), up to "listening" for a server (which is stopped)."""
    rw, ro = hip_build.binds(hip.root, source, repo)
    ro = {**ro, model.parent: MODEL_DIR_IN_ROOT}
    if case.dev_kfd == "mode-000-file":
        fake = scratch / "kfd"
        fake.write_bytes(b"")
        fake.chmod(0)
        ro[fake] = "/dev/kfd"
    args = [a.format(model=f"{MODEL_DIR_IN_ROOT}/{model.name}", port=port) for a in case.args]
    argv = [f"{BIN}/llama-server", *args]
    if case.user:
        argv = ["setpriv", f"--reuid={case.user}", "--regid=nogroup", "--clear-groups",
                "--", *argv]
    cmd = rootfs.nspawn_command(hip.root, argv, env=dict(case.env), binds=rw, ro_binds=ro,
                                tmpfs=case.tmpfs, as_pid1=case.serve)
    if case.serve:
        lines = _serve(cmd)
    else:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                              stdin=subprocess.DEVNULL)
        lines = (done.stdout + done.stderr).splitlines()
    # The port is the kernel's pick: the same text for every run.
    return [line.replace(f":{port}", ":PORT") for line in strip_stamps(_ours(lines))]


def _serve(cmd: list[str], timeout_s: float = 300.0) -> list[str]:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "listening on http://" in line:
                listening.set()
        listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    listening.wait(timeout=timeout_s)
    rootfs.stop(proc)
    reader.join(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
    return lines


_NSPAWN_NOTICES = ("/run/systemd/nspawn/propagate", "Trying to halt container")


def _ours(lines: list[str]) -> list[str]:
    """Drop systemd-nspawn's own notices (its propagation directory, its halt on SIGTERM)."""
    return [line for line in lines if not any(n in line for n in _NSPAWN_NOTICES)]
