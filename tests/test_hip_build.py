"""The HIP build for gfx906, compiled for real: `mi50ctl build-llama --backend hip --targets gfx906`
in a Debian sid root with ROCm 7.2 from experimental (tests/systemd/rocm_root.py), against the
same llama.cpp source the cpu tests use.

Checked: build-llama succeeds and says what it used; libggml-hip.so carries code objects for
gfx906 and for nothing else (read from its .hip_fatbin section here, and listed by the root's
clang-offload-bundler); `--version` runs; `--list-devices` and a start with `-ngl all` print the
no-device line and fall back to the CPU, which mi50d.diagnose calls degraded.

When it runs: always where the suite runs as root with debootstrap and systemd-nspawn (CI). A
fresh machine builds the root (~1.5 min) and the gfx906 build (21 min on 2 cores, measured);
afterwards both are cached and build-llama only confirms the build is up to date.
MI50D_TEST_HIP=0 skips it. Caches: ~/.cache/mi50d/rootfs/sid-rocm-<key>/ and
~/.cache/mi50d/hip-build/<source>-<toolchain key>/ (see tests/systemd/hip_build.py).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mi50d.host.diagnose import diagnose
from mi50d.llama import source as llamasrc
from tests.conftest import free_port
from tests.systemd import hip_build, rootfs

pytestmark = [pytest.mark.hip, pytest.mark.timeout(4 * 3600)]

REPO = Path(__file__).resolve().parents[1]
BIN = f"{hip_build.BUILD_ROOT_IN_ROOT}/current/bin"
MODELS_IN_ROOT = "/srv/models"
GFX906 = "hipv4-amdgcn-amd-amdhsa--gfx906"
NO_DEVICE = "ggml_cuda_init: failed to initialize ROCm: no ROCm-capable device is detected"
EM_AMDGPU = 224
EF_AMDGPU_MACH = 0xFF
EF_AMDGPU_MACH_AMDGCN_GFX906 = 0x2F


def in_root(hip: hip_build.HipBuild, *argv: str, env: dict[str, str] | None = None,
            tmpfs: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    rw, ro = hip_build.binds(hip.root, llamasrc.ensure_source(), REPO)
    return rootfs.run_in(hip.root, argv, env=env, binds=rw, ro_binds=ro, tmpfs=tmpfs,
                         timeout=300)


# --- the build ------------------------------------------------------------------------------


def test_build_llama_succeeds_and_says_what_it_used(hip: hip_build.HipBuild) -> None:
    lines = hip.output.splitlines()
    assert "hip build for gfx906; ROCm at /usr" in lines
    assert any(line.startswith("  ROCm 7.2.") and "(the distribution's packages, ROCm in /usr)"
               in line for line in lines), hip.output[-3000:]
    assert any(re.fullmatch(r"  environment: HIPCXX=/usr/lib/llvm-\d+/bin/clang HIP_PATH=/usr", x)
               for x in lines), hip.output[-3000:]
    assert any(line.startswith(("built ", "up to date: ")) for line in lines)
    record = json.loads((hip.bin_dir.parent / "build.json").read_text())
    assert record["backend"] == "hip" and record["targets"] == ["gfx906"]
    assert "ROCM_PATH" not in record["env"]
    assert "-DGGML_CUDA_FA=ON" in record["configure"]
    first = hip.build_root / "first-build.json"
    if first.exists():  # the figures the first build took, for the record
        print(f"\nfirst HIP build: {first.read_text()}")  # noqa: T201


def fatbin_bundles(library: Path) -> list[tuple[str, bytes]]:
    """(triple, code object) of every entry of every clang offload bundle in .hip_fatbin."""
    data = library.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{library}: not a 64-bit ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx]
    names = data[strtab[4]:strtab[4] + strtab[5]]
    fatbin = next((s for s in sections
                   if names[s[0]:names.index(b"\0", s[0])] == b".hip_fatbin"), None)
    assert fatbin is not None, f"{library} has no .hip_fatbin section"
    section = data[fatbin[4]:fatbin[4] + fatbin[5]]
    magic = b"__CLANG_OFFLOAD_BUNDLE__"
    assert b"CCOB" not in section[:4], "compressed bundles: not expected from this build"
    entries: list[tuple[str, bytes]] = []
    pos = section.find(magic)
    while pos >= 0:
        count, = struct.unpack_from("<Q", section, pos + len(magic))
        at, end = pos + len(magic) + 8, pos
        for _ in range(count):
            offset, size, triple_len = struct.unpack_from("<QQQ", section, at)
            triple = section[at + 24:at + 24 + triple_len].decode()
            entries.append((triple, section[pos + offset:pos + offset + size]))
            at += 24 + triple_len
            end = max(end, pos + offset + size)
        pos = section.find(magic, max(end, pos + 1))
    return entries


def test_the_library_carries_gfx906_code_objects_only(hip: hip_build.HipBuild,
                                                      tmp_path: Path) -> None:
    library = hip.bin_dir / "libggml-hip.so"
    entries = fatbin_bundles(library)
    device = [(t, code) for t, code in entries if not t.startswith("host-")]
    assert device, "no device code objects"
    assert {t for t, _ in device} == {GFX906}
    for _, code in device:
        assert code[:4] == b"\x7fELF"
        machine, = struct.unpack_from("<H", code, 0x12)
        flags, = struct.unpack_from("<I", code, 0x30)
        assert machine == EM_AMDGPU and flags & EF_AMDGPU_MACH == EF_AMDGPU_MACH_AMDGCN_GFX906
    print(f"\n{len(device)} gfx906 code objects, {sum(len(c) for _, c in device)} bytes")  # noqa: T201
    # The toolchain's own reader agrees (it lists the first bundle of the section).
    first = tmp_path / "bundle.o"
    data = library.read_bytes()
    start = data.index(b"__CLANG_OFFLOAD_BUNDLE__")
    first.write_bytes(data[start:start + 64 * 1024 * 1024])
    rw, ro = hip_build.binds(hip.root, llamasrc.ensure_source(), REPO)
    # Debian keeps the unsuffixed LLVM tools (llvm-objcopy, which the bundler calls) in its
    # versioned directory.
    listed = rootfs.run_in(hip.root, ["sh", "-c", "PATH=$(echo /usr/lib/llvm-*/bin):$PATH "
                                      "clang-offload-bundler --list --type=o "
                                      "--input=/srv/bundle/bundle.o"],
                           binds=rw, ro_binds={**ro, tmp_path: "/srv/bundle"}, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert GFX906 in listed.stdout.split()


def test_version_runs(hip: hip_build.HipBuild) -> None:
    done = in_root(hip, f"{BIN}/llama-server", "--version")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^version: \S+", done.stdout + done.stderr, re.M)


def test_list_devices_without_a_gpu(hip: hip_build.HipBuild) -> None:
    done = in_root(hip, f"{BIN}/llama-server", "--list-devices")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert NO_DEVICE in out
    assert re.search(r"^Available devices:\n\s+\(none\)$", out, re.M), out
    (d,) = diagnose(out.splitlines())
    assert d.code == "no_rocm_device" and d.degraded


# --- serving with -ngl all and no GPU -------------------------------------------------------


class Server:
    """llama-server in the root, its output collected until it exits."""

    def __init__(self, hip: hip_build.HipBuild, model: Path, port: int, *args: str,
                 env: dict[str, str] | None = None) -> None:
        rw, ro = hip_build.binds(hip.root, llamasrc.ensure_source(), REPO)
        cmd = rootfs.nspawn_command(
            hip.root, [f"{BIN}/llama-server", "-m", f"{MODELS_IN_ROOT}/{model.name}",
                       "--host", "127.0.0.1",
                       "--port", str(port), "-c", "512", *args],
            env=env, binds=rw, ro_binds={**ro, model.parent: MODELS_IN_ROOT},
            as_pid1=True)
        self.port = port
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "listening on http://" in line:
                self.listening.set()
        self.listening.set()  # it exited: wake the waiter

    def get(self, path: str, body: dict[str, object] | None = None) -> tuple[int, str]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()

    def stop(self) -> int:
        rc = rootfs.stop(self.proc)
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc


@pytest.fixture
def server(hip: hip_build.HipBuild, tiny_model: Path) -> Iterator[Server]:
    s = Server(hip, tiny_model, free_port(), "-ngl", "all")
    try:
        assert s.listening.wait(timeout=300) and s.proc.poll() is None, "\n".join(s.lines)
        yield s
    finally:
        s.stop()


def test_start_with_ngl_all_falls_back_to_the_cpu(server: Server) -> None:
    assert server.get("/health") == (200, '{"status":"ok"}')
    status, body = server.get("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200 and json.loads(body)["choices"]
    assert any(NO_DEVICE in line for line in server.lines), "\n".join(server.lines[:40])
    found = diagnose(server.lines, expects_gpu=True)
    assert [d.code for d in found] == ["no_rocm_device"] and found[0].degraded
    assert diagnose(server.lines, expects_gpu=False) == []
    assert server.stop() == 0


def test_host_without_rocm_cannot_load_the_hip_build(hip: hip_build.HipBuild) -> None:
    """Outside the root (this host has no ROCm libraries) the loader names what is missing."""
    if shutil.which("hipconfig") or Path("/opt/rocm").exists():
        pytest.skip("this host has ROCm")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(hip.bin_dir, Path(tmp) / "bin", symlinks=True)
        done = subprocess.run([f"{tmp}/bin/llama-server", "--version"], capture_output=True,
                              text=True, timeout=60, check=False)
    assert done.returncode != 0
    (d,) = diagnose(done.stderr.splitlines())
    assert d.code == "shared_library"
    assert re.search(r"lib(hipblas|rocblas|amdhip64|hsa-runtime64|rocsolver)\S*\.so", d.message)
