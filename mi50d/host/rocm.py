"""Where ROCm is on this host, which version it is, and where rocBLAS reads its Tensile files.

Two layouts exist in the wild, and both are read from files only (no child processes), so tests
point `find_rocm` at fixture trees:

- AMD's repository: one prefix, `/opt/rocm` (often a link to `/opt/rocm-7.0.2`), with the
  version in `.info/version` and rocBLAS's kernels in `lib/rocblas/library`.
- The distribution's packages (Debian, Ubuntu): ROCm in `/usr`, libraries in the multiarch
  directory. Debian ships no `.info/version`; the version is read, in this order, from
  `include/rocm-core/rocm_version.h` (librocm-core-dev), the dpkg status of `libamdhip64-N`,
  the first line of `share/doc/libamdhip64-N/changelog.Debian.gz`, and last
  `lib/<triplet>/cmake/hip/hip-config-version.cmake`, which has only HIP's version (7.2.53211:
  its major.minor is ROCm's, its third number is a build number, so only two parts are kept).
  rocBLAS's kernels are in `lib/<triplet>/rocblas/<soversion>/library` (Debian's rocBLAS looks
  for `/rocblas/5/library` next to librocblas.so.5, AMD's for `/rocblas/library`).

`ROCBLAS_TENSILE_LIBPATH`, when set, is the only directory rocBLAS reads, and so the only one
checked. hipcc and hipconfig are looked for in `<prefix>/bin`, then on PATH.

This module also owns telling what a llama-server was built for (`build_backend`): a HIP build on
a host where no GPU is usable runs on the CPU and lists no devices, just like a CPU build, but
the fix is the host's, not the build's.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Layout = Literal["amd", "distribution"]
TENSILE_ENV = "ROCBLAS_TENSILE_LIBPATH"
MI50_TARGET = "gfx906"
HIP_TOOLS = ("hipcc", "hipconfig")
_NUMBERS = re.compile(r"(\d+(?:\.\d+)*)")
_HEADER_FIELD = re.compile(r"^#define\s+ROCM_VERSION_(MAJOR|MINOR|PATCH)\s+(\d+)", re.MULTILINE)
_CMAKE_VERSION = re.compile(r'set\(PACKAGE_VERSION\s+"([0-9.]+)"\)')
_CHANGELOG = re.compile(r"^\S+ \((?:\d+:)?([0-9.]+)")
_HIP_RUNTIME = re.compile(r"^libamdhip64-\d+$")
_ROCM_INIT = re.compile(r"ggml_cuda_init: failed to initialize ROCm: (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Version:
    """A version and the file it was read from, e.g. (7, 2, 4) from rocm_version.h."""

    parts: tuple[int, ...]
    source: Path

    def __str__(self) -> str:
        return ".".join(map(str, self.parts))


@dataclass(frozen=True)
class Rocm:
    """One ROCm installation: its prefix, layout and version (None when no file says it)."""

    prefix: Path
    layout: Layout
    version: Version | None

    def describe(self) -> str:
        """`ROCm 7.0.2 at /opt/rocm`; a distribution's says where its version came from."""
        shown = f"ROCm {self.version}" if self.version else "ROCm of unknown version"
        if self.layout == "amd":
            return f"{shown} at {self.prefix}"
        source = f"; version from {self.version.source}" if self.version else ""
        return f"{shown} at {self.prefix} (distribution packages{source})"


@dataclass(frozen=True)
class TensileLibrary:
    """The directory rocBLAS will read Tensile files from, why that one, and what it holds."""

    path: Path
    reason: str  # "ROCBLAS_TENSILE_LIBPATH" or "next to <librocblas.so.N>" or "default"
    files: tuple[Path, ...]  # the gfx906 files in it (or the target asked for)


def find_rocm(rocm_path: Path, env: Mapping[str, str] | None = None) -> Rocm | None:
    """ROCm at `rocm_path` (host.rocm_path); else `$ROCM_PATH`; else, for a path in an `opt`
    directory, the newest versioned `opt/rocm-X.Y.Z` beside it (AMD's packages without the
    `/opt/rocm` link) and the `usr` beside that `opt` (distribution packages); else where
    hipconfig on PATH lives."""
    for prefix in _candidates(rocm_path, env or {}):
        found = _at(prefix)
        if found is not None:
            return found
    return None


def _candidates(rocm_path: Path, env: Mapping[str, str]) -> list[Path]:
    out = [rocm_path]
    if env.get("ROCM_PATH"):
        out.append(Path(env["ROCM_PATH"]))
    if rocm_path.parent.name == "opt":
        out += sorted(rocm_path.parent.glob("rocm-[0-9]*"), key=_version_key, reverse=True)
        out.append(rocm_path.parent.parent / "usr")
    hipconfig = which("hipconfig", env.get("PATH", ""))
    if hipconfig is not None:
        out.append(Path(os.path.realpath(hipconfig)).parent.parent)
    return out


def _version_key(path: Path) -> tuple[int, ...]:
    m = _NUMBERS.search(path.name)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def _at(prefix: Path) -> Rocm | None:
    info = prefix / ".info" / "version"
    if info.is_file():
        return Rocm(prefix, "amd", _first_numbers(info, info.read_text(errors="replace")))
    if _multiarch_dirs(prefix, "libamdhip64.so*") or _multiarch_dirs(prefix, "librocblas.so*"):
        return Rocm(prefix, "distribution", distribution_version(prefix))
    if any((prefix / "lib").glob("libamdhip64.so*")) or (prefix / "bin" / "hipconfig").is_file():
        return Rocm(prefix, "amd", None)
    return None


def _first_numbers(source: Path, text: str, keep: int = 3) -> Version | None:
    m = _NUMBERS.search(text)
    return Version(tuple(int(p) for p in m.group(1).split("."))[:keep], source) if m else None


def distribution_version(prefix: Path) -> Version | None:
    """ROCm's version from the files a distribution installs under `prefix` (see the module
    docstring for the order)."""
    header = prefix / "include" / "rocm-core" / "rocm_version.h"
    fields = dict(_HEADER_FIELD.findall(_read(header)))
    if {"MAJOR", "MINOR"} <= fields.keys():
        parts = [fields["MAJOR"], fields["MINOR"], *([fields["PATCH"]] if "PATCH" in fields else [])]
        return Version(tuple(int(p) for p in parts), header)
    status = prefix.parent / "var" / "lib" / "dpkg" / "status"
    installed = dpkg_version(_read(status), _HIP_RUNTIME)
    if installed:
        return _first_numbers(status, installed)
    for doc in sorted((prefix / "share" / "doc").glob("libamdhip64-*/changelog.Debian.gz")):
        m = _CHANGELOG.match(_read_gzip_line(doc))
        if m:
            return _first_numbers(doc, m.group(1))
    for cmake in _multiarch_dirs(prefix, "cmake/hip/hip-config-version.cmake"):
        m = _CMAKE_VERSION.search(_read(cmake))
        if m:
            return _first_numbers(cmake, m.group(1), keep=2)
    return None


def dpkg_version(status: str, package: re.Pattern[str]) -> str | None:
    """The version of the first installed package whose name matches, from dpkg's status file
    (its RFC 822 stanzas); the epoch and the Debian revision stay in the string."""
    for stanza in status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if (package.match(fields.get("Package", "")) and "Version" in fields
                and fields.get("Status", "").endswith(" installed")):
            return fields["Version"].split(":", 1)[-1]
    return None


def tensile_library(rocm: Rocm | None, env: Mapping[str, str] | None = None,
                    target: str = MI50_TARGET) -> TensileLibrary | None:
    """Where rocBLAS reads Tensile files from: `ROCBLAS_TENSILE_LIBPATH` when set, else the
    library directory next to librocblas (the first that exists), else the layout's default;
    None without ROCm and without the variable."""
    override = (env or {}).get(TENSILE_ENV)
    if override:
        return _library(Path(override), TENSILE_ENV, target)
    if rocm is None:
        return None
    candidates = library_dirs(rocm)
    for path, reason in candidates:
        if path.is_dir():
            return _library(path, reason, target)
    path, _ = candidates[0]
    return _library(path, "default", target)


def library_dirs(rocm: Rocm) -> list[tuple[Path, str]]:
    """The directories rocBLAS may read, each with why, best first (the layout's default
    first when no librocblas is found)."""
    found: list[tuple[Path, str]] = []
    libdirs = [rocm.prefix / "lib", rocm.prefix / "lib64", *_triplets(rocm.prefix)]
    for libdir in libdirs:
        for lib in sorted(libdir.glob("librocblas.so.*")):
            soversion = lib.name.removeprefix("librocblas.so.").split(".")[0]
            for path in (libdir / "rocblas" / soversion / "library", libdir / "rocblas" / "library"):
                if all(path != p for p, _ in found):
                    found.append((path, f"next to {lib}"))
    default = (rocm.prefix / "lib" / "rocblas" / "library" if rocm.layout == "amd" else
               _triplet_dir(rocm.prefix) / "rocblas" / "5" / "library")
    if not found:
        found.append((default, "default"))
    return found


def _library(path: Path, reason: str, target: str) -> TensileLibrary:
    files = tuple(sorted(path.glob(f"*{target}*"))) if path.is_dir() else ()
    return TensileLibrary(path, reason, files)


def which(name: str, path_env: str) -> Path | None:
    """`name` in the directories of a PATH string (like shutil.which, on any root)."""
    for directory in path_env.split(os.pathsep):
        if directory:
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    return None


def find_tools(rocm: Rocm | None, path_env: str,
               names: Sequence[str] = HIP_TOOLS) -> dict[str, Path | None]:
    """Each HIP tool in `<prefix>/bin`, else on PATH; None where missing."""
    out: dict[str, Path | None] = {}
    for name in names:
        own = rocm.prefix / "bin" / name if rocm else None
        out[name] = own if own is not None and own.is_file() else which(name, path_env)
    return out


def _triplets(prefix: Path) -> list[Path]:
    """The multiarch library directories `<prefix>/lib/<triplet>` (x86_64-linux-gnu, ...)."""
    lib = prefix / "lib"
    return sorted(d for d in lib.glob("*-linux-gnu*") if d.is_dir()) if lib.is_dir() else []


def _multiarch_dirs(prefix: Path, pattern: str) -> list[Path]:
    """`pattern` under each multiarch library directory."""
    return [p for d in _triplets(prefix) for p in sorted(d.glob(pattern))]


def _triplet_dir(prefix: Path) -> Path:
    found = _triplets(prefix)
    return found[0] if found else prefix / "lib" / "x86_64-linux-gnu"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _read_gzip_line(path: Path) -> str:
    try:
        with gzip.open(path, "rt", errors="replace") as f:
            return f.readline()
    except (OSError, EOFError):
        return ""


def read_build(binary: Path) -> dict[str, Any] | None:
    """The build.json `mi50ctl build-llama` writes at <build>/build.json for <build>/bin/..."""
    for candidate in (binary.parent.parent / "build.json", binary.parent / "build.json"):
        try:
            record = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            return record
    return None


def build_backend(binary: Path, output: str = "") -> str | None:
    """"hip", "cpu" (or another backend build.json names) for a llama-server: its build.json,
    else what its output says (a HIP build that finds no device still logs "ggml_cuda_init:
    failed to initialize ROCm"), else a libggml-hip beside it; None when nothing tells."""
    record = read_build(binary)
    if record is not None and isinstance(record.get("backend"), str):
        return str(record["backend"])
    if _ROCM_INIT.search(output):
        return "hip"
    if any(binary.parent.glob("libggml-hip.so*")):
        return "hip"
    return None


def rocm_init_failure(output: str) -> str | None:
    """Why a HIP build found no GPU, from its "ggml_cuda_init: failed to initialize ROCm: ..."
    line, e.g. "no ROCm-capable device is detected"."""
    m = _ROCM_INIT.search(output)
    return m.group(1).strip() if m else None
