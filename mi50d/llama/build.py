"""Building llama.cpp's llama-server (and friends) into versioned prefixes under one root.

Layout of a root (default /var/lib/mi50d/llama as root, else ~/.local/share/mi50d/llama):

    work/<backend>/        the cmake build tree, reused so rebuilds are incremental
    <build-id>/bin/        the built tools plus the shared libraries next to them ($ORIGIN rpath)
    <build-id>/build.json  source, backend, targets, cmake command lines, fingerprint, --version
    current -> <build-id>  switched atomically, only after a build succeeded and its
                           llama-server --version runs

`plan_build` is pure: it returns the exact environment and cmake command lines, so they can be
tested. `build` runs a plan (or reuses an identical earlier build) and raises `BuildError` with a
one-line message; it never prints or exits.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Literal

from mi50d.host import kfd
from mi50d.llama.errors import BuildError as BuildError
from mi50d.llama.errors import MissingToolError as MissingToolError
from mi50d.llama.hip import DISTRO_DEV_PACKAGES, HIP_OPTIONS
from mi50d.llama.hip import HipToolchain as HipToolchain
from mi50d.llama.hip import hip_toolchain as hip_toolchain

Backend = Literal["hip", "cpu"]
BACKENDS: tuple[Backend, ...] = ("hip", "cpu")
DEFAULT_TOOLS = ("llama-server", "llama-cli", "llama-bench", "rpc-server")
# A tool's cmake target names, newest first: llama.cpp renamed rpc-server to ggml-rpc-server.
TOOL_TARGETS = {"rpc-server": ("ggml-rpc-server", "rpc-server")}
FALLBACK_TARGET = "gfx906"
ARCH_ENV = "LLAMACPP_ROCM_ARCH"
VERSION_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BuildPlan:
    source: Path
    root: Path
    backend: Backend
    targets: tuple[str, ...]  # gfx targets; empty for cpu
    tools: tuple[str, ...]  # cmake target names
    env: dict[str, str]  # set on top of the caller's environment
    configure: list[str]
    build: list[str]
    toolchain: str = ""  # the compiler's version where it matters (hip)
    notes: tuple[str, ...] = ()  # what the build uses and why, for the user

    @property
    def work_dir(self) -> Path:
        return self.root / "work" / self.backend

    def fingerprint(self, content_id: str) -> str:
        """Identifies what a build produces; `-j` is left out since it does not change the result."""
        key: dict[str, object] = {
            "source": str(self.source), "content": content_id, "backend": self.backend,
            "targets": self.targets, "tools": self.tools, "env": self.env,
            "configure": self.configure}
        if self.toolchain:
            key["toolchain"] = self.toolchain
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class BuildResult:
    prefix: Path
    build_id: str
    reused: bool
    version: str
    record: dict[str, object] = field(default_factory=dict)

    @property
    def llama_server(self) -> Path:
        return self.prefix / "bin" / "llama-server"


def default_root() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/mi50d/llama")
    return Path.home() / ".local/share/mi50d/llama"


def parse_targets(text: str) -> tuple[str, ...]:
    """'gfx906, gfx908;gfx90a' -> ('gfx906', 'gfx908', 'gfx90a'): commas, semicolons or spaces."""
    return tuple(dict.fromkeys(t for t in re.split(r"[,;\s]+", text) if t))


def resolve_targets(explicit: str | None, env: Mapping[str, str], sysfs_root: Path) -> tuple[str, ...]:
    """--targets, else $LLAMACPP_ROCM_ARCH, else the GPUs present, else gfx906."""
    for text in (explicit, env.get(ARCH_ENV)):
        if text and parse_targets(text):
            return parse_targets(text)
    return tuple(kfd.gfx_targets(sysfs_root)) or (FALLBACK_TARGET,)


def source_targets(source: Path) -> set[str]:
    """Executable target names the source tree's CMakeLists.txt files define."""
    names: set[str] = set()
    pattern = re.compile(r"(?:set\s*\(\s*TARGET\s+|add_executable\s*\(\s*)([A-Za-z0-9_.+-]+)")
    for dirpath, dirnames, filenames in os.walk(source):
        # Skip VCS data and build trees (a tree with a CMakeCache.txt), which can be huge.
        dirnames[:] = [d for d in dirnames if d != ".git"
                       and not (Path(dirpath, d) / "CMakeCache.txt").exists()]
        if "CMakeLists.txt" in filenames:
            text = Path(dirpath, "CMakeLists.txt").read_text(errors="replace")
            names.update(pattern.findall(text))
    return names


def select_tools(source: Path, requested: Sequence[str]) -> tuple[str, ...]:
    """The cmake targets to build: llama-server plus `requested` (each must exist), else plus
    every default tool the source has. llama-server is always built: `current` promises it."""
    if not (source / "CMakeLists.txt").is_file():
        raise BuildError(f"{source}: no CMakeLists.txt; pass --source with a llama.cpp checkout")
    available = source_targets(source)
    if "llama-server" not in available:
        raise BuildError(f"{source}: defines no llama-server target; is it a llama.cpp checkout?")
    chosen: list[str] = []
    for tool in ("llama-server", *(requested or DEFAULT_TOOLS)):
        match = next((t for t in TOOL_TARGETS.get(tool, (tool,)) if t in available), None)
        if match is not None:
            chosen.append(match)
        elif requested:
            raise BuildError(f"{source}: this llama.cpp has no target {tool!r}")
    return tuple(dict.fromkeys(chosen))


def plan_build(source: Path, root: Path, backend: Backend, tools: Sequence[str],
               targets: Sequence[str] = (), jobs: int = 1, hip: HipToolchain | None = None,
               generator: str | None = None) -> BuildPlan:
    """The exact environment and cmake command lines; pure."""
    work = root / "work" / backend
    env: dict[str, str] = {}
    configure = ["cmake", "-S", str(source), "-B", str(work)]
    notes: tuple[str, ...] = ()
    if backend == "hip":
        if hip is None:
            raise ValueError("the hip backend needs a HipToolchain")
        env = hip.build_env()
        configure += ["-DGGML_HIP=ON", f"-DAMDGPU_TARGETS={';'.join(targets)}",
                      "-DCMAKE_BUILD_TYPE=Release", *hip.cmake_defines(),
                      *(f"-D{opt}" for opt, _ in HIP_OPTIONS)]
        notes = hip.notes()
    else:
        # The cpu build serves tests and demos: no web UI, so cmake does not try to download one
        # from a model hub (the prebuilt-UI default), which machines with only package
        # registries cannot reach.
        configure += ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                      "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
                      "-DLLAMA_USE_PREBUILT_UI=OFF"]
    configure.append("-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON")
    # Always explicit: cmake keeps an option from an earlier configure of the same work tree, so
    # a build without the RPC server after one with it would still link the RPC backend.
    rpc = any(t in TOOL_TARGETS["rpc-server"] for t in tools)
    configure.append(f"-DGGML_RPC={'ON' if rpc else 'OFF'}")
    if generator is not None:
        configure += ["-G", generator]
    build = ["cmake", "--build", str(work), "--config", "Release", f"-j{jobs}",
             "--target", *tools]
    return BuildPlan(source=source, root=root, backend=backend,
                     targets=tuple(targets) if backend == "hip" else (), tools=tuple(tools),
                     env=env, configure=configure, build=build,
                     toolchain=hip.fingerprint if hip is not None else "", notes=notes)


# --- the host: programs on PATH ---------------------------------------------------------------

_BUILD_ESSENTIAL = "install it: apt-get install build-essential"


def _which(names: Sequence[str], path: str) -> str | None:
    return next((found for n in names if (found := shutil.which(n, path=path))), None)


def check_programs(backend: Backend, env: Mapping[str, str]) -> str | None:
    """Raise MissingToolError for the first program the build lacks; return the generator to use
    (None: cmake's default, Unix Makefiles)."""
    path = env.get("PATH", os.defpath)
    compilers = [("C compiler (cc, gcc or clang)", "CC", ("cc", "gcc", "clang")),
                 ("C++ compiler (c++, g++ or clang++)", "CXX", ("c++", "g++", "clang++"))]
    if not _which(["cmake"], path):
        raise MissingToolError("cmake not found; install it: apt-get install cmake")
    for what, var, names in compilers:
        chosen = env.get(var, "").split()
        if not _which(chosen[:1] or names, path):
            raise MissingToolError(f"{what} not found; {_BUILD_ESSENTIAL}")
    generator = None
    if not _which(["make"], path):
        if not _which(["ninja"], path):
            raise MissingToolError("make or ninja not found; install it: apt-get install make")
        generator = "Ninja"
    if backend == "hip" and not _which(["hipconfig"], path):
        raise MissingToolError("hipconfig not found on PATH; install ROCm: AMD's packages "
                               "(rocm-hip-sdk, then add /opt/rocm/bin to PATH) or the "
                               f"distribution's (apt-get install hipcc {DISTRO_DEV_PACKAGES})")
    return generator


def content_id(source: Path, skip: Path | None = None) -> str:
    """A hash of every file in the source tree, except .git, build trees and `skip` (a build root
    placed inside the source)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if d != ".git" and Path(dirpath, d) != skip
                             and not (Path(dirpath, d) / "CMakeCache.txt").exists())
        for name in sorted(filenames):
            path = Path(dirpath, name)
            digest.update(f"{path.relative_to(source)}\0".encode())
            if path.is_symlink():
                digest.update(f"->{os.readlink(path)}\0".encode())
            elif path.is_file():
                with path.open("rb") as f:
                    digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


# --- the root: builds, current, cache --------------------------------------------------------


def llama_version(binary: Path) -> str | None:
    """`llama-server --version` output, or None when it does not run."""
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                              timeout=VERSION_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout + proc.stderr).strip() if proc.returncode == 0 else None


def list_builds(root: Path) -> list[tuple[Path, dict[str, object]]]:
    """(prefix, build.json) of every finished build, newest first."""
    builds = []
    for record in root.glob("*/build.json"):
        if record.parent.is_symlink():  # `current`
            continue
        try:
            builds.append((record.parent, json.loads(record.read_text())))
        except (OSError, ValueError):
            continue
    return sorted(builds, key=lambda b: str(b[1].get("created", "")), reverse=True)


def current_build(root: Path) -> Path | None:
    link = root / "current"
    return link.resolve() if link.is_symlink() else None


def switch_current(root: Path, prefix: Path) -> None:
    """Point `current` at `prefix` atomically: a new relative symlink renamed over the old one."""
    tmp = root / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(prefix.name)
    os.replace(tmp, root / "current")


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest builds, never the current one; return what was deleted."""
    current = current_build(root)
    removed = []
    for prefix, _ in list_builds(root)[max(keep, 0):]:
        if prefix.resolve() != current:
            shutil.rmtree(prefix)
            removed.append(prefix)
    return removed


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"{root}: another build-llama is running on this root") from None
        yield


def _run(argv: list[str], env: Mapping[str, str], output: IO[str] | None, what: str) -> None:
    try:
        proc = subprocess.run(argv, env=dict(env), stdout=output, stderr=output, check=False)
    except OSError as exc:
        raise BuildError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}); see cmake's output above")


def _install(plan: BuildPlan, staging: Path) -> None:
    """Copy the tools and every shared library of the build's bin dir (symlinks as symlinks)."""
    built = plan.work_dir / "bin"
    (staging / "bin").mkdir(parents=True)
    for item in sorted(built.iterdir()):
        if item.name in plan.tools or ".so" in item.name:
            shutil.copy2(item, staging / "bin" / item.name, follow_symlinks=False)
    for tool in plan.tools:
        if not (staging / "bin" / tool).exists():
            raise BuildError(f"cmake finished but {built / tool} is missing")


def _new_id(root: Path, plan: BuildPlan, fingerprint: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    build_id = f"{stamp}-{plan.backend}-{fingerprint[:10]}"
    n = 1
    while (root / build_id).exists():
        n += 1
        build_id = f"{stamp}-{plan.backend}-{fingerprint[:10]}-{n}"
    return build_id


def build(plan: BuildPlan, base_env: Mapping[str, str], *, force: bool = False,
          output: IO[str] | None = None) -> BuildResult:
    """Build `plan` into a new prefix and make it current, or reuse an identical earlier build.

    cmake's output goes to `output` (None: inherited). Nothing under `root` except `work/` changes
    unless the build succeeded and its llama-server runs.
    """
    root = plan.root
    with _locked(root):
        content = content_id(plan.source, skip=root)
        fingerprint = plan.fingerprint(content)
        if not force:
            for prefix, old in list_builds(root):
                if old.get("fingerprint") != fingerprint:
                    continue
                version = llama_version(prefix / "bin" / "llama-server")
                if version is not None:
                    switch_current(root, prefix)
                    return BuildResult(prefix, prefix.name, True, version, old)
        env = {**base_env, **plan.env}
        _run(plan.configure, env, output, "cmake configure")
        _run(plan.build, env, output, "cmake build")
        build_id = _new_id(root, plan, fingerprint)
        staging = root / f".partial-{build_id}"
        try:
            _install(plan, staging)
            version = llama_version(staging / "bin" / "llama-server")
            if version is None:
                raise BuildError("the new llama-server does not run `--version`; "
                                 "current build left unchanged")
            record: dict[str, object] = {
                "id": build_id, "created": datetime.now(UTC).isoformat(timespec="microseconds"),
                "source": str(plan.source), "content_id": content, "backend": plan.backend,
                "targets": list(plan.targets), "tools": list(plan.tools),
                "env": plan.env, "toolchain": plan.toolchain, "configure": plan.configure,
                "build": plan.build, "notes": list(plan.notes),
                "fingerprint": fingerprint, "version": version,
            }
            (staging / "build.json").write_text(json.dumps(record, indent=2) + "\n")
            staging.rename(root / build_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        switch_current(root, root / build_id)
        return BuildResult(root / build_id, build_id, False, version, record)
