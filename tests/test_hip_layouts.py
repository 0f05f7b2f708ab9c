"""build-llama's HIP toolchain in both ROCm layouts, against fixture trees and hipconfig scripts.

No ROCm compiler is needed: each tree is what the layout holds where build-llama looks (hipconfig,
clang, the CMake package configs), and `hipconfig` is a script that prints what the real one
prints there. The figures come from real installs: Debian's ROCm 7.2.4 (sid + experimental, see
../shared/research/hip-build-debian.md: `hipconfig -l` /usr/lib/llvm-22/bin, `-R` /usr,
`--version` 7.2.53211-9999, CMake packages in /usr/lib/x86_64-linux-gnu/cmake) and AMD's 7.0.2
(/opt/rocm -> /opt/rocm-7.0.2, clang in lib/llvm/bin, CMake packages in lib/cmake). The real
compile in the distribution's layout is tests/test_hip_build.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mi50d.llama import build, hip
from tests.conftest import MI50CTL

CLANG_DEBIAN = "Debian clang version 22.1.8 (3)"
CLANG_AMD = "AMD clang version 20.0.0git (https://github.com/ROCm/llvm-project.git roc-7.0.2)"


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


def _hipconfig(bin_dir: Path, clang_dir: Path, rocm: Path, version: str) -> None:
    _script(bin_dir / "hipconfig", f"""case "$1" in
  -l|--hipclangpath) echo {clang_dir} ;;
  -R|--rocmpath) echo {rocm} ;;
  -p|--path) echo {rocm} ;;
  --version|-v) printf %s {version} ;;
  *) echo "hipconfig: unknown option $1" >&2; exit 1 ;;
esac
""")


def _cmake_packages(cmake_dir: Path, names: tuple[str, ...] = hip.HIP_CMAKE_PACKAGES) -> None:
    for name in names:
        (cmake_dir / name).mkdir(parents=True)
        (cmake_dir / name / f"{name}-config.cmake").write_text(f"# {name}\n")


def distro_tree(top: Path) -> Path:
    """ROCm in <top>/usr, as Debian's packages install it; returns the bin dir for PATH."""
    usr = top / "usr"
    _script(usr / "lib" / "llvm-22" / "bin" / "clang", f'echo "{CLANG_DEBIAN}"\n')
    _cmake_packages(usr / "lib" / "x86_64-linux-gnu" / "cmake")
    _hipconfig(usr / "bin", usr / "lib" / "llvm-22" / "bin", usr, "7.2.53211-9999")
    return usr / "bin"


def amd_tree(top: Path) -> Path:
    """ROCm in <top>/opt/rocm -> rocm-7.0.2, as AMD's packages install it."""
    real = top / "opt" / "rocm-7.0.2"
    (top / "opt" / "rocm").parent.mkdir(parents=True, exist_ok=True)
    (top / "opt" / "rocm").symlink_to("rocm-7.0.2")
    rocm = top / "opt" / "rocm"
    _script(real / "lib" / "llvm" / "bin" / "clang", f'echo "{CLANG_AMD}"\n')
    _cmake_packages(real / "lib" / "cmake")
    (real / ".info").mkdir()
    (real / ".info" / "version").write_text("7.0.2-56\n")
    _hipconfig(real / "bin", rocm / "lib" / "llvm" / "bin", rocm, "7.0.51831-a3e329ad8")
    return rocm / "bin"


def _env(bin_dir: Path) -> dict[str, str]:
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def _plan(toolchain: hip.HipToolchain) -> build.BuildPlan:
    return build.plan_build(Path("/src/llama.cpp"), Path("/var/lib/mi50d/llama"), "hip",
                            ("llama-server",), ("gfx906",), jobs=2, hip=toolchain)


HIP_DEFINES = [
    "-DGGML_CUDA_FA=ON", "-DGGML_CUDA_FA_ALL_QUANTS=OFF", "-DGGML_CUDA_FORCE_MMQ=OFF",
    "-DGGML_CUDA_FORCE_CUBLAS=OFF", "-DGGML_HIP_NO_VMM=ON", "-DGGML_HIP_GRAPHS=ON"]


def test_distribution_layout(tmp_path: Path) -> None:
    toolchain = build.hip_toolchain(_env(distro_tree(tmp_path)))
    usr = tmp_path / "usr"
    assert toolchain == hip.HipToolchain(
        clang_dir=usr / "lib/llvm-22/bin", rocm_path=usr, version="7.2.53211-9999",
        compiler=CLANG_DEBIAN, cmake_dir=usr / "lib/x86_64-linux-gnu/cmake")
    assert toolchain.layout == f"the distribution's packages, ROCm in {usr}"
    plan = _plan(toolchain)
    # The seed recipe's two variables; no ROCM_PATH, which sends Debian's clang to /usr/amdgcn.
    assert plan.env == {"HIPCXX": f"{usr}/lib/llvm-22/bin/clang", "HIP_PATH": str(usr)}
    # The three CMake packages named, so a leftover /opt/rocm cannot supply them.
    cmake = usr / "lib/x86_64-linux-gnu/cmake"
    assert plan.configure == [
        "cmake", "-S", "/src/llama.cpp", "-B", "/var/lib/mi50d/llama/work/hip", "-DGGML_HIP=ON",
        "-DAMDGPU_TARGETS=gfx906", "-DCMAKE_BUILD_TYPE=Release", f"-Dhip_DIR={cmake}/hip",
        f"-Dhipblas_DIR={cmake}/hipblas", f"-Drocblas_DIR={cmake}/rocblas", *HIP_DEFINES,
        "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON", "-DGGML_RPC=OFF"]
    assert plan.notes[0] == (
        f"ROCm 7.2.53211-9999 at {usr} (the distribution's packages, ROCm in {usr}); "
        f"compiler {usr}/lib/llvm-22/bin/clang ({CLANG_DEBIAN})")
    assert plan.notes[1] == (f"HIP, hipBLAS and rocBLAS CMake packages from {cmake} (named, so "
                             "that no other ROCm's are found)")
    assert plan.toolchain == f"7.2.53211-9999; {CLANG_DEBIAN}"


def test_amd_layout(tmp_path: Path) -> None:
    toolchain = build.hip_toolchain(_env(amd_tree(tmp_path)))
    rocm = tmp_path / "opt" / "rocm"
    assert toolchain.clang_dir == rocm / "lib/llvm/bin"
    assert toolchain.rocm_path == rocm
    assert toolchain.cmake_dir == rocm / "lib/cmake"
    assert toolchain.layout == "AMD's packages"
    plan = _plan(toolchain)
    assert plan.env == {"HIPCXX": f"{rocm}/lib/llvm/bin/clang", "HIP_PATH": str(rocm)}
    assert f"-Dhip_DIR={rocm}/lib/cmake/hip" in plan.configure
    assert plan.notes[0].startswith(f"ROCm 7.0.51831-a3e329ad8 at {rocm} (AMD's packages)")


def test_the_layouts_differ_only_in_paths(tmp_path: Path) -> None:
    distro = _plan(build.hip_toolchain(_env(distro_tree(tmp_path / "d"))))
    amd = _plan(build.hip_toolchain(_env(amd_tree(tmp_path / "a"))))
    def without_dirs(argv: list[str]) -> list[str]:
        return [a for a in argv if "_DIR=" not in a]
    assert without_dirs(distro.configure) == without_dirs(amd.configure)
    assert distro.fingerprint("c") != amd.fingerprint("c")  # another compiler, another build
    # Every option the build passes is explained, and so is what it leaves out.
    for opt, why in hip.HIP_OPTIONS:
        assert f"{opt}: {why}" in distro.notes
    assert "no rocWMMA" in distro.notes[-1]


def test_compiler_upgrade_changes_the_fingerprint(tmp_path: Path) -> None:
    env = _env(distro_tree(tmp_path))
    before = _plan(build.hip_toolchain(env)).fingerprint("c")
    _script(tmp_path / "usr/lib/llvm-22/bin/clang", 'echo "Debian clang version 22.1.9 (1)"\n')
    assert _plan(build.hip_toolchain(env)).fingerprint("c") != before


def test_hipconfig_naming_a_missing_clang(tmp_path: Path) -> None:
    env = _env(distro_tree(tmp_path))
    clang_dir = tmp_path / "usr/lib/llvm-22/bin"
    (clang_dir / "clang").unlink()
    with pytest.raises(build.BuildError) as err:
        build.hip_toolchain(env)
    assert str(err.value) == (
        f"hipconfig -l names {clang_dir}, but {clang_dir}/clang is missing; install ROCm's "
        "compiler (AMD: rocm-llvm; Debian/Ubuntu: the clang-N package hipcc depends on)")


@pytest.mark.parametrize("missing", hip.HIP_CMAKE_PACKAGES)
def test_rocm_without_a_cmake_package(tmp_path: Path, missing: str) -> None:
    env = _env(distro_tree(tmp_path))
    shutil.rmtree(tmp_path / "usr/lib/x86_64-linux-gnu/cmake" / missing)
    with pytest.raises(build.BuildError) as err:
        build.hip_toolchain(env)
    assert str(err.value) == (
        f"hipconfig -R names {tmp_path / 'usr'}, but it has no CMake packages for hip, hipblas, "
        "rocblas (in lib/cmake or lib/<multiarch>/cmake); install AMD's rocm-hip-sdk, or "
        "apt-get install libamdhip64-dev libhipblas-dev librocblas-dev")


def test_hipconfig_that_fails(tmp_path: Path) -> None:
    _script(tmp_path / "bin" / "hipconfig", "echo 'hipconfig: HIP_PATH is broken' >&2; exit 3\n")
    with pytest.raises(build.BuildError) as err:
        build.hip_toolchain(_env(tmp_path / "bin"))
    assert str(err.value) == "hipconfig -l failed (exit 3): hipconfig: HIP_PATH is broken"


# --- through mi50ctl, with real cmake on a stand-in source ------------------------------------

FAKE_CMAKELISTS = """cmake_minimum_required(VERSION 3.13)
project(fakellama C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_executable(llama-server main.c)
"""
FAKE_MAIN = ('#include <stdio.h>\nint main(void) { fprintf(stderr, "version: 1 (fake)\\n"); '
             "return 0; }\n")


@pytest.mark.parametrize("layout", ["distro", "amd"])
def test_build_llama_says_what_it_used(tmp_path: Path, layout: str) -> None:
    """The stand-in source ignores the HIP variables, so cmake builds it with the host's C
    compiler; what is checked is what build-llama passed and said, in each layout."""
    bin_dir = (distro_tree if layout == "distro" else amd_tree)(tmp_path / "tree")
    source = tmp_path / "src"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(FAKE_CMAKELISTS)
    (source / "main.c").write_text(FAKE_MAIN)
    done = subprocess.run(
        [MI50CTL, "build-llama", "--backend", "hip", "--targets", "gfx906", "--tool",
         "llama-server", "--source", str(source), "--root", str(tmp_path / "root"), "-j1"],
        capture_output=True, text=True, env={**os.environ, **_env(bin_dir)}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    toolchain = build.hip_toolchain(_env(bin_dir))
    lines = done.stdout.splitlines()
    assert lines[0] == f"hip build for gfx906; ROCm at {toolchain.rocm_path}"
    assert lines[1:1 + len(toolchain.notes())] == [f"  {n}" for n in toolchain.notes()]
    record = json.loads((tmp_path / "root" / "current" / "build.json").read_text())
    assert record["env"] == toolchain.build_env()
    assert record["notes"] == list(toolchain.notes())
    assert record["toolchain"] == toolchain.fingerprint
