"""The HIP toolchain a build uses, in either ROCm layout, and the HIP options it passes (and why).

Two layouts are common:
- AMD's packages: ROCm in /opt/rocm (a link to /opt/rocm-X.Y.Z), its clang in
  /opt/rocm/lib/llvm/bin, CMake packages in /opt/rocm/lib/cmake;
- the distribution's (Debian, Ubuntu): ROCm in /usr, the stock LLVM's clang
  (/usr/lib/llvm-N/bin), CMake packages in /usr/lib/<multiarch>/cmake.
`hipconfig -l` and `-R` name the compiler directory and ROCm in both, so the seed recipe
(`HIPCXX="$(hipconfig -l)/clang" HIP_PATH="$(hipconfig -R)"`) works in both. What it does not
pin is which ROCm's CMake packages are found: ggml-hip's CMakeLists.txt adds /opt/rocm to the
search path whenever that directory exists (unless $ROCM_PATH names another), which mixes two
ROCms on a host with the distribution's in /usr and a leftover /opt/rocm. So the build names the
three package directories (hip_DIR, hipblas_DIR, rocblas_DIR) under hipconfig's ROCm.
It does not set ROCM_PATH: clang reads it too, and Debian's clang with ROCM_PATH=/usr looks for
the device libraries in /usr/amdgcn and fails ("cannot find ROCm device library"; seen in the
sid root), while without it clang finds them where Debian installs them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mi50d.llama.errors import BuildError

VERSION_TIMEOUT_S = 60.0
# CMake packages ggml-hip's CMakeLists.txt requires (find_package ... REQUIRED).
HIP_CMAKE_PACKAGES = ("hip", "hipblas", "rocblas")
DISTRO_DEV_PACKAGES = "libamdhip64-dev libhipblas-dev librocblas-dev"

# What a HIP build passes beyond the seed recipe, each with the reason, read from llama.cpp's
# ggml/CMakeLists.txt, ggml-hip/CMakeLists.txt and ggml-cuda sources; none of it was measured on
# an MI50. They are llama.cpp's defaults written out, so that a reused build tree's CMakeCache
# cannot keep another value, and so that the build says what it chose.
HIP_OPTIONS: tuple[tuple[str, str], ...] = (
    ("GGML_CUDA_FA=ON",
     "flash-attention kernels: mi50d runs gfx906 instances with flash_attn on, because with it "
     "off the legacy memory pool grows by GiB with the context"),
    ("GGML_CUDA_FA_ALL_QUANTS=OFF",
     "flash attention for K/V caches of one type (f16, q8_0, q4_0, bf16); every mixed pair "
     "would add many kernels and compile time"),
    ("GGML_CUDA_FORCE_MMQ=OFF",
     "not needed: on gfx906 (GCN with dp4a, no MFMA) ggml already picks its MMQ kernels for "
     "quantized matrix products"),
    ("GGML_CUDA_FORCE_CUBLAS=OFF",
     "keep MMQ: forcing rocBLAS would dequantize for every quantized matrix product"),
    ("GGML_HIP_NO_VMM=ON",
     "llama.cpp's HIP default, the legacy memory pool (mi50d's VRAM estimate counts it)"),
    ("GGML_HIP_GRAPHS=ON",
     "llama.cpp's default; ggml turns graphs off only below NVIDIA Volta, never for AMD GPUs"),
)
# Said, not set: this llama.cpp has no rocWMMA option, and gfx906 has neither WMMA nor MFMA.
HIP_NOT_USED = "no rocWMMA flash attention: gfx906 has neither WMMA nor MFMA units"


@dataclass(frozen=True)
class HipToolchain:
    """What `hipconfig -l` (the directory of ROCm's clang) and `hipconfig -R` (ROCm) print, and
    where that ROCm keeps the CMake packages ggml-hip needs."""

    clang_dir: Path
    rocm_path: Path
    version: str = ""  # `hipconfig --version`: a ROCm upgrade in place changes the fingerprint
    compiler: str = ""  # the first line of `clang --version`: so does a compiler upgrade
    cmake_dir: Path | None = None  # holds hip/, hipblas/ and rocblas/ package configs

    @property
    def layout(self) -> str:
        """Which layout this is, in words."""
        if self.cmake_dir is not None and "-linux-" in self.cmake_dir.parent.name:
            return f"the distribution's packages, ROCm in {self.rocm_path}"
        # AMD's ROCm carries its own LLVM fork inside (lib/llvm; llvm before ROCm 6).
        if any(self.clang_dir.is_relative_to(self.rocm_path / d) for d in ("lib/llvm", "llvm")):
            return "AMD's packages"
        return "a ROCm tree"

    @property
    def fingerprint(self) -> str:
        return "; ".join(x for x in (self.version, self.compiler) if x)

    def build_env(self) -> dict[str, str]:
        return {"HIPCXX": f"{self.clang_dir}/clang", "HIP_PATH": str(self.rocm_path)}

    def cmake_defines(self) -> list[str]:
        """hip_DIR, hipblas_DIR and rocblas_DIR under this ROCm (none when it was not looked up)."""
        if self.cmake_dir is None:
            return []
        return [f"-D{name}_DIR={self.cmake_dir / name}" for name in HIP_CMAKE_PACKAGES]

    def notes(self) -> tuple[str, ...]:
        """What a build with this toolchain uses and why, one line each."""
        env = self.build_env()
        lines = [f"ROCm {self.version or '(version unknown)'} at {self.rocm_path} ({self.layout}); "
                 f"compiler {env['HIPCXX']}" + (f" ({self.compiler})" if self.compiler else "")]
        if self.cmake_dir is not None:
            lines.append(f"HIP, hipBLAS and rocBLAS CMake packages from {self.cmake_dir} "
                         "(named, so that no other ROCm's are found)")
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in env.items()))
        lines += [f"{opt}: {why}" for opt, why in HIP_OPTIONS]
        lines.append(HIP_NOT_USED)
        return tuple(lines)


def find_cmake_dir(rocm: Path) -> Path | None:
    """The first `cmake` directory under `rocm` that has every package in HIP_CMAKE_PACKAGES:
    AMD's lib/cmake (or lib64/cmake), the distribution's lib/<multiarch>/cmake."""
    candidates = [rocm / "lib" / "cmake", rocm / "lib64" / "cmake",
                  *sorted(rocm.glob("lib/*-linux-*/cmake"))]
    for cmake in candidates:
        if all(any((cmake / name).glob("*onfig.cmake")) for name in HIP_CMAKE_PACKAGES):
            return cmake
    return None


def hip_toolchain(env: Mapping[str, str]) -> HipToolchain:
    """Ask hipconfig where ROCm's clang and ROCm itself are, and check that both are usable: the
    seed recipe's HIPCXX must exist, and ROCm must hold the CMake packages ggml-hip requires."""
    def ask(flag: str) -> str:
        try:
            proc = subprocess.run(["hipconfig", flag], env=dict(env), capture_output=True,
                                  text=True, check=False, timeout=VERSION_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildError(f"cannot run hipconfig {flag}: {exc}") from None
        if proc.returncode != 0 or not proc.stdout.strip():
            raise BuildError(f"hipconfig {flag} failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[:200]}")
        return proc.stdout.strip().splitlines()[-1].strip()

    clang_dir, rocm = Path(ask("-l")), Path(ask("-R"))
    clang = clang_dir / "clang"
    if not os.access(clang, os.X_OK):
        raise BuildError(f"hipconfig -l names {clang_dir}, but {clang} is missing; install "
                         "ROCm's compiler (AMD: rocm-llvm; Debian/Ubuntu: the clang-N package "
                         "hipcc depends on)")
    cmake_dir = find_cmake_dir(rocm)
    if cmake_dir is None:
        raise BuildError(f"hipconfig -R names {rocm}, but it has no CMake packages for "
                         f"{', '.join(HIP_CMAKE_PACKAGES)} (in lib/cmake or lib/<multiarch>/cmake); "
                         f"install AMD's rocm-hip-sdk, or apt-get install {DISTRO_DEV_PACKAGES}")
    return HipToolchain(clang_dir=clang_dir, rocm_path=rocm, version=ask("--version"),
                        compiler=_first_line([str(clang), "--version"], env),
                        cmake_dir=cmake_dir)


def _first_line(argv: list[str], env: Mapping[str, str]) -> str:
    try:
        proc = subprocess.run(argv, env=dict(env), capture_output=True, text=True, check=False,
                              timeout=VERSION_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return next(iter(proc.stdout.strip().splitlines()), "") if proc.returncode == 0 else ""
