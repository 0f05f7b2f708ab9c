"""mi50d.host.rocm on both ROCm layouts: AMD's /opt/rocm (the recorded two-MI50 trees) and
Debian's packages in /usr (tests/fixtures/hosts/debian-rocm-7.2, file names from the real
7.2.4 packages), and what preflight and doctor make of them."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from mi50d.config import DaemonConfig, InstanceConfig
from mi50d.host import rocm
from mi50d.host.accounts import Account
from mi50d.host.checks import Check
from mi50d.host.doctor import host_checks
from mi50d.host.preflight import rocblas_check, run_preflight
from tests.ggufwriter import write_model

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
DEBIAN = HOSTS / "debian-rocm-7.2"
LIBDIR = Path("usr/lib/x86_64-linux-gnu")
VIDEO_GID = 44


def debian_copy(root: Path) -> Path:
    """A writable copy of the Debian tree (links kept), to take files away from."""
    shutil.copytree(DEBIAN, root, symlinks=True)
    return root


def named(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_debian_layout_found_from_the_default_opt_rocm() -> None:
    found = rocm.find_rocm(DEBIAN / "opt" / "rocm", {})
    assert found is not None
    assert (found.prefix, found.layout) == (DEBIAN / "usr", "distribution")
    assert found.version is not None and found.version.parts == (7, 2, 4)
    assert found.version.source == DEBIAN / "var" / "lib" / "dpkg" / "status"
    assert found.describe() == (f"ROCm 7.2.4 at {DEBIAN / 'usr'} (distribution packages; "
                                f"version from {DEBIAN / 'var/lib/dpkg/status'})")


def test_debian_version_sources_in_order(tmp_path: Path) -> None:
    root = debian_copy(tmp_path / "root")
    usr = root / "usr"
    header = usr / "include" / "rocm-core" / "rocm_version.h"
    header.parent.mkdir(parents=True)
    # the lines of librocm-core-dev 7.2.4-1~exp1's header that carry the version
    header.write_text("#define ROCM_VERSION_MAJOR   7\n#define ROCM_VERSION_MINOR   2\n"
                      "#define ROCM_VERSION_PATCH   4\n")

    def version() -> tuple[tuple[int, ...], Path] | None:
        found = rocm.find_rocm(usr, {})
        assert found is not None and found.layout == "distribution"
        return (found.version.parts, found.version.source) if found.version else None

    assert version() == ((7, 2, 4), header)
    header.unlink()
    status = root / "var" / "lib" / "dpkg" / "status"
    assert version() == ((7, 2, 4), status)
    status.unlink()
    changelog = usr / "share" / "doc" / "libamdhip64-7" / "changelog.Debian.gz"
    assert version() == ((7, 2, 4), changelog)
    changelog.unlink()
    cmake = root / LIBDIR / "cmake" / "hip" / "hip-config-version.cmake"
    assert version() == ((7, 2), cmake)  # HIP's 7.2.53211: the third number is a build number
    cmake.unlink()
    assert version() is None
    found = rocm.find_rocm(usr, {})
    assert found is not None and found.describe() == (
        f"ROCm of unknown version at {usr} (distribution packages)")


def test_dpkg_status_ignores_packages_that_are_not_installed() -> None:
    status = ("Package: libamdhip64-6\nStatus: deinstall ok config-files\nVersion: 6.1.2-3\n\n"
              "Package: libamdhip64-7\nStatus: install ok installed\nVersion: 1:7.2.4-1~exp2\n")
    pattern = rocm._HIP_RUNTIME
    assert rocm.dpkg_version(status, pattern) == "7.2.4-1~exp2"
    assert rocm.dpkg_version(status.split("\n\n")[0], pattern) is None


def test_changelog_first_line_is_read(tmp_path: Path) -> None:
    root = debian_copy(tmp_path / "root")
    (root / "var" / "lib" / "dpkg" / "status").unlink()
    doc = root / "usr" / "share" / "doc" / "libamdhip64-7" / "changelog.Debian.gz"
    with gzip.open(doc, "rt") as f:
        assert f.readline().startswith("rocm-hipamd (7.2.4-1~exp2) experimental")


def test_amd_layout_and_its_tensile_library() -> None:
    prefix = HOSTS / "two-mi50" / "opt" / "rocm"
    found = rocm.find_rocm(prefix, {})
    assert found is not None and (found.prefix, found.layout) == (prefix, "amd")
    assert found.version is not None and str(found.version) == "7.0.2"
    assert found.describe() == f"ROCm 7.0.2 at {prefix}"
    library = rocm.tensile_library(found, {})
    assert library is not None
    assert (library.path, library.reason) == (prefix / "lib" / "rocblas" / "library", "default")
    assert [p.name for p in library.files] == [
        "Kernels.so-000-gfx906-xnack-.hsaco",
        "TensileLibrary_Type_HH_Contraction_l_Alik_Bljk_Cijk_Dijk_gfx906.co",
        "TensileLibrary_Type_SS_Contraction_l_Alik_Bljk_Cijk_Dijk_gfx906.dat",
        "TensileLibrary_lazy_gfx906.dat"]


def test_debian_tensile_library_is_found_next_to_librocblas() -> None:
    found = rocm.find_rocm(DEBIAN / "usr", {})
    library = rocm.tensile_library(found, {})
    assert library is not None
    assert library.path == DEBIAN / LIBDIR / "rocblas" / "5" / "library"
    assert library.reason.startswith("next to ") and "librocblas.so.5" in library.reason
    assert len(library.files) == 6 and all("gfx906" in p.name for p in library.files)
    gfx908 = rocm.tensile_library(found, {}, target="gfx908")
    assert gfx908 is not None and len(gfx908.files) == 2


def test_tensile_libpath_overrides_the_tree(tmp_path: Path) -> None:
    found = rocm.find_rocm(DEBIAN / "usr", {})
    empty = tmp_path / "empty"
    empty.mkdir()
    library = rocm.tensile_library(found, {rocm.TENSILE_ENV: str(empty)})
    assert library is not None and library.reason == rocm.TENSILE_ENV and library.files == ()
    # without any ROCm the variable still names the directory rocBLAS reads
    own = rocm.tensile_library(None, {rocm.TENSILE_ENV: str(DEBIAN / LIBDIR / "rocblas/5/library")})
    assert own is not None and len(own.files) == 6
    assert rocm.tensile_library(None, {}) is None


def test_tools_in_the_prefix_or_on_path(tmp_path: Path) -> None:
    debian = rocm.find_rocm(DEBIAN / "usr", {})
    assert rocm.find_tools(debian, "") == {"hipcc": DEBIAN / "usr/bin/hipcc",
                                           "hipconfig": DEBIAN / "usr/bin/hipconfig"}
    amd = rocm.find_rocm(HOSTS / "two-mi50" / "opt" / "rocm", {})
    assert rocm.find_tools(amd, "") == {"hipcc": None, "hipconfig": None}
    path = f"{tmp_path}:{DEBIAN / 'usr' / 'bin'}"
    assert rocm.find_tools(amd, path)["hipconfig"] == DEBIAN / "usr/bin/hipconfig"


def test_hipconfig_on_path_locates_a_tree_elsewhere(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    assert rocm.find_rocm(nowhere, {}) is None
    found = rocm.find_rocm(nowhere, {"PATH": str(DEBIAN / "usr" / "bin")})
    assert found is not None and found.prefix == DEBIAN / "usr"


# --- preflight and doctor on the Debian layout -------------------------------------------------

def gpu_host(world: Path, tree: Path) -> dict[str, object]:
    dev = world / "dev"
    (dev / "dri").mkdir(parents=True, exist_ok=True)
    for node in (dev / "kfd", dev / "dri" / "renderD128", dev / "dri" / "renderD129"):
        node.touch()
        os.chown(node, 0, VIDEO_GID)
        node.chmod(0o660)
    return {"sysfs_root": HOSTS / "two-mi50" / "sys", "dev_root": dev,
            "rocm_path": tree / "opt" / "rocm"}


def daemon_for(world: Path, tree: Path) -> DaemonConfig:
    binary = world / "llama-server"
    binary.write_text("#!/bin/sh\necho 'version: 1 (test)'\n")
    binary.chmod(0o755)
    return DaemonConfig.model_validate({"llama_server": binary, "socket": world / "none.sock",
                                        "host": gpu_host(world, tree)})


def test_rocblas_check_passes_on_debian() -> None:
    cfg = DaemonConfig.model_validate({"host": {"rocm_path": DEBIAN / "opt" / "rocm"}})
    check = rocblas_check(cfg, {})
    assert check.status == "ok", check.line()
    assert check.message == (f"6 gfx906 Tensile files in {DEBIAN / LIBDIR / 'rocblas/5/library'} "
                             f"(ROCm 7.2.4 at {DEBIAN / 'usr'} (distribution packages; version "
                             f"from {DEBIAN / 'var/lib/dpkg/status'}))")


def test_rocblas_check_without_gfx906_files_on_debian(tmp_path: Path) -> None:
    root = debian_copy(tmp_path / "root")
    for f in (root / LIBDIR / "rocblas" / "5" / "library").glob("*gfx906*"):
        f.unlink()
    cfg = DaemonConfig.model_validate({"host": {"rocm_path": root / "usr"}})
    check = rocblas_check(cfg, {})
    assert check.status == "fail"
    assert check.message.startswith("rocBLAS in ROCm 7.2.4 has no gfx906 Tensile files: ")
    assert "ships none" not in check.message  # true of AMD's packages, not of Debian's
    assert check.fix is not None and check.fix.startswith(
        f"mi50ctl tensile install PACKAGE_OR_DIR --rocm-path {root / 'usr'}")


def test_rocblas_check_names_a_libpath_without_files(tmp_path: Path) -> None:
    cfg = DaemonConfig.model_validate({"host": {"rocm_path": DEBIAN / "usr"}})
    check = rocblas_check(cfg, {rocm.TENSILE_ENV: str(tmp_path)})
    assert check.status == "fail"
    assert check.message.startswith(f"ROCBLAS_TENSILE_LIBPATH={tmp_path} has no gfx906")


def test_instance_env_libpath_reaches_the_preflight(world: Path, tmp_path: Path) -> None:
    model = write_model(world / "m.gguf")
    cfg = daemon_for(world, DEBIAN)
    keys: dict[str, object] = {"model": model, "port": 18411, "n_gpu_layers": "all",
                               "name": "t", "source": world / "t.toml"}
    plain = InstanceConfig.model_validate(keys)
    moved = InstanceConfig.model_validate({**keys, "env": {rocm.TENSILE_ENV: str(tmp_path)}})
    nobody = Account("nobody", 65534, 65534, (65534, VIDEO_GID))
    assert named(run_preflight(plain, cfg, nobody, run_binary=False))["rocblas"].status == "ok"
    check = named(run_preflight(moved, cfg, nobody, run_binary=False))["rocblas"]
    assert check.status == "fail" and str(tmp_path) in check.message


def test_doctor_on_debian(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{DEBIAN / 'usr' / 'bin'}:/usr/bin:/bin")
    checks = named(host_checks(daemon_for(world, DEBIAN),
                               Account("nobody", 65534, 65534, (65534, VIDEO_GID))))
    assert checks["rocm"].status == "ok"
    assert checks["rocm"].message.startswith(f"ROCm 7.2.4 at {DEBIAN / 'usr'} (distribution")
    assert checks["rocm"].data["layout"] == "distribution"
    assert checks["rocblas"].status == "ok", checks["rocblas"].line()
    assert checks["hip tools"].status == "ok"
    assert checks["hip tools"].message == f"hipcc and hipconfig in {DEBIAN / 'usr' / 'bin'}"


def test_doctor_without_any_rocm(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(world / "nowhere"))  # a host's own ROCm stays out of it
    monkeypatch.delenv("ROCM_PATH", raising=False)
    empty = world / "empty"
    empty.mkdir()
    checks = named(host_checks(daemon_for(world, empty), None))
    assert checks["rocm"].status == "fail"
    assert checks["rocm"].message.startswith(f"no ROCm at {empty / 'opt' / 'rocm'}")
    assert checks["rocblas"].status == "fail"
    assert checks["hip tools"].status == "warn"


def test_the_real_debian_root() -> None:
    """The sid root with Debian's ROCm 7.2.4 packages (built by the HIP build test; skipped
    without it): the real dpkg status, multiarch tree and 156 gfx906 files."""
    roots = sorted(Path.home().glob(".cache/mi50d/rootfs/sid-rocm-*/usr/bin/hipconfig"))
    if not roots:
        pytest.skip("no sid-rocm root (built by the HIP build test)")
    root = roots[0].parents[2]
    found = rocm.find_rocm(root / "opt" / "rocm", {})
    assert found is not None and (found.prefix, found.layout) == (root / "usr", "distribution")
    assert found.version is not None and found.version.parts == (7, 2, 4)
    library = rocm.tensile_library(found, {})
    assert library is not None and library.path == root / LIBDIR / "rocblas" / "5" / "library"
    assert len(library.files) == 156
    assert rocm.find_tools(found, "")["hipconfig"] == root / "usr" / "bin" / "hipconfig"


def test_rocm_path_variable_and_versioned_trees(tmp_path: Path) -> None:
    opt = tmp_path / "opt"
    for version in ("6.3.3", "7.0.2", "6.4.4"):
        info = opt / f"rocm-{version}" / ".info" / "version"
        info.parent.mkdir(parents=True)
        info.write_text(f"{version}-1\n")
    found = rocm.find_rocm(opt / "rocm", {})  # no /opt/rocm link: the newest release
    assert found is not None and found.prefix == opt / "rocm-7.0.2"
    chosen = rocm.find_rocm(opt / "rocm", {"ROCM_PATH": str(opt / "rocm-6.3.3")})
    assert chosen is not None and chosen.version is not None
    assert str(chosen.version) == "6.3.3"
