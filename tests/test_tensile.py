"""`mi50ctl tensile` with Debian's real librocblas5 package (fetched once, tests/debcache.py)
against fake ROCm trees: AMD's /opt/rocm without gfx906 files (the recorded two-mi50-no-tensile
tree) and Debian's /usr layout. Bad input: a package without gfx906 files (built with dpkg-deb
from the real package's gfx90a files), a truncated and a garbage .deb, a read-only tree and a
full file system (real tmpfs mounts); each leaves the tree as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mi50d.config import DaemonConfig
from mi50d.host import tensile
from mi50d.host.preflight import rocblas_check
from tests.conftest import MI50CTL
from tests.debcache import ROCBLAS, cached_deb
from tests.realmounts import tmpfs

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
LIBRARY = Path("lib") / "rocblas" / "library"
DEB_LIBRARY = "usr/lib/x86_64-linux-gnu/rocblas/5/library"
GFX906_FILES = 156  # in librocblas5 7.2.4-1~exp1


@pytest.fixture(scope="session")
def rocblas_deb() -> Path:
    return cached_deb(*ROCBLAS)


@pytest.fixture(scope="session")
def unpacked(rocblas_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real package's gfx906 and gfx90a library files, unpacked by dpkg-deb (not by the
    code under test)."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is needed to unpack the package for comparison")
    root = tmp_path_factory.mktemp("librocblas5")
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(rocblas_deb)],
                          stdout=subprocess.PIPE) as tar:
        subprocess.run(["tar", "-x", "-C", str(root), "--wildcards", f"./{DEB_LIBRARY}/*gfx906*",
                        f"./{DEB_LIBRARY}/*gfx90a*"], stdin=tar.stdout, check=True)
    assert tar.returncode == 0
    return root / DEB_LIBRARY


def amd_tree(where: Path) -> Path:
    """A writable /opt/rocm 7.0.2 whose rocBLAS has no gfx906 files."""
    shutil.copytree(HOSTS / "two-mi50-no-tensile" / "opt", where / "opt")
    return where / "opt" / "rocm"


def snapshot(directory: Path) -> dict[str, str]:
    """Every path below `directory` with its content's hash: the tree, to compare."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(directory.rglob("*"))}


def rocblas(prefix: Path) -> str:
    cfg = DaemonConfig.model_validate({"host": {"rocm_path": prefix}})
    check = rocblas_check(cfg, {})
    return check.status


def test_install_the_real_package_then_undo(rocblas_deb: Path, tmp_path: Path,
                                            unpacked: Path) -> None:
    prefix = amd_tree(tmp_path)
    library = prefix / LIBRARY
    before = snapshot(prefix)
    assert rocblas(prefix) == "fail"
    _, where = tensile.locate(prefix, {})
    assert where == library

    done = tensile.install(rocblas_deb, library)
    assert (done.source.package, done.source.version) == ROCBLAS
    assert len(done.files) == GFX906_FILES and all("gfx906" in n for n in done.files)
    assert rocblas(prefix) == "ok"
    for name in done.files:  # byte for byte what dpkg-deb unpacks
        assert (library / name).read_bytes() == (unpacked / name).read_bytes()
    added = set(snapshot(prefix)) - set(before)  # only those files and the manifest
    assert added == {str(LIBRARY / n) for n in (*done.files, tensile.MANIFEST)}
    manifest = json.loads((library / tensile.MANIFEST).read_text())
    assert manifest["package"] == "librocblas5" and len(manifest["files"]) == GFX906_FILES
    state = tensile.status(library)
    assert (state["files"], state["installed_by_mi50d"], state["changed"]) == (
        GFX906_FILES, GFX906_FILES, [])
    assert not list(library.glob(f"{tensile.STAGING_PREFIX}*"))

    with pytest.raises(tensile.TensileError, match="run mi50ctl tensile uninstall first"):
        tensile.install(rocblas_deb, library)

    removed = tensile.uninstall(library)
    assert len(removed.removed) == GFX906_FILES and removed.kept == ()
    assert snapshot(prefix) == before
    assert rocblas(prefix) == "fail"
    with pytest.raises(tensile.TensileError, match="mi50d installed nothing there"):
        tensile.uninstall(library)


def test_a_changed_file_is_kept_on_uninstall(unpacked: Path, tmp_path: Path) -> None:
    library = amd_tree(tmp_path) / LIBRARY
    done = tensile.install(unpacked, library)
    assert len(done.files) == GFX906_FILES
    edited = library / done.files[0]
    edited.write_bytes(b"changed by hand")
    state = tensile.status(library)
    assert state["changed"] == [edited.name]
    removed = tensile.uninstall(library)
    assert removed.kept == (edited.name,) and len(removed.removed) == GFX906_FILES - 1
    assert edited.read_bytes() == b"changed by hand"
    assert not (library / tensile.MANIFEST).exists()


def test_never_overwrites_a_file_it_did_not_install(unpacked: Path, tmp_path: Path) -> None:
    library = amd_tree(tmp_path) / LIBRARY
    (library / "TensileLibrary_lazy_gfx906.dat").write_bytes(b"someone else's")
    before = snapshot(library)
    with pytest.raises(tensile.TensileError, match="already has 1 gfx906 files not installed "
                       "by mi50d"):
        tensile.install(unpacked, library)
    assert snapshot(library) == before


def test_debian_layout_already_has_them(unpacked: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(HOSTS / "debian-rocm-7.2", root, symlinks=True)
    found, library = tensile.locate(root / "opt" / "rocm", {})
    assert found.layout == "distribution" and library == root / DEB_LIBRARY
    with pytest.raises(tensile.TensileError, match="not installed by mi50d"):
        tensile.install(unpacked, library)
    for f in library.glob("*gfx906*"):
        f.unlink()
    assert rocblas(root / "usr") == "fail"
    assert len(tensile.install(unpacked, library).files) == GFX906_FILES
    assert rocblas(root / "usr") == "ok"
    assert tensile.version_mismatch(found, ROCBLAS[1]) is None


def test_version_mismatch_is_said(tmp_path: Path) -> None:
    found, _ = tensile.locate(amd_tree(tmp_path), {})
    warning = tensile.version_mismatch(found, ROCBLAS[1])
    assert warning is not None and "7.2.4-1~exp1" in warning and "ROCm 7.0.2" in warning


def test_package_without_gfx906_files(unpacked: Path, tmp_path: Path) -> None:
    """A real .deb (dpkg-deb -b) holding four of the package's gfx90a files only."""
    build = tmp_path / "pkg"
    (build / "DEBIAN").mkdir(parents=True)
    (build / "DEBIAN" / "control").write_text(
        "Package: librocblas-gfx90a\nVersion: 7.2.4-1\nArchitecture: amd64\n"
        "Maintainer: mi50d tests <tests@localhost>\nDescription: gfx90a files only\n")
    target = build / DEB_LIBRARY
    target.mkdir(parents=True)
    for f in sorted(unpacked.glob("*gfx90a*"), key=lambda p: p.stat().st_size)[:4]:
        shutil.copyfile(f, target / f.name)
    deb = tmp_path / "librocblas-gfx90a_7.2.4-1_amd64.deb"
    subprocess.run(["dpkg-deb", "-Zxz", "-z1", "-b", str(build), str(deb)], check=True,
                   capture_output=True)
    library = amd_tree(tmp_path / "t") / LIBRARY
    before = snapshot(library)
    with pytest.raises(tensile.TensileError) as caught:
        tensile.install(deb, library)
    assert str(caught.value).startswith(f"{deb} has no gfx906 Tensile files")
    assert "(it has gfx90a)" in str(caught.value)
    assert snapshot(library) == before


def test_corrupt_packages(rocblas_deb: Path, tmp_path: Path) -> None:
    library = amd_tree(tmp_path) / LIBRARY
    before = snapshot(library)
    truncated = tmp_path / "librocblas5_truncated.deb"
    with rocblas_deb.open("rb") as f:
        truncated.write_bytes(f.read(8 << 20))  # ar header, control and 8 MB of data.tar.xz
    with pytest.raises(tensile.TensileError, match="corrupt or truncated"):
        tensile.install(truncated, library)
    garbage = tmp_path / "garbage.deb"
    garbage.write_bytes(b"<html>404 Not Found</html>\n")
    with pytest.raises(tensile.TensileError, match="not a Debian package"):
        tensile.install(garbage, library)
    with pytest.raises(tensile.TensileError, match=r"\.rpm packages are not read"):
        (tmp_path / "rocblas.rpm").touch()
        tensile.install(tmp_path / "rocblas.rpm", library)
    assert snapshot(library) == before


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "mnt", "rw") as point:
        yield point


def test_read_only_tree(unpacked: Path, small_tmpfs: Path) -> None:
    library = amd_tree(small_tmpfs) / LIBRARY
    before = snapshot(library)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(tensile.TensileError) as caught:
        tensile.install(unpacked, library)
    assert str(caught.value).startswith(f"cannot write to {library}: Read-only file system")
    assert "remount it read-write" in str(caught.value)
    assert snapshot(library) == before


def test_full_file_system_leaves_nothing(unpacked: Path, small_tmpfs: Path) -> None:
    """43 MB of files into a 16 MB tmpfs: the copy fails midway, and the staged part goes."""
    library = amd_tree(small_tmpfs) / LIBRARY
    before = snapshot(library)
    with pytest.raises(tensile.TensileError, match="no space left"):
        tensile.install(unpacked, library)
    assert snapshot(library) == before


def test_the_cli(unpacked: Path, tmp_path: Path) -> None:
    prefix = amd_tree(tmp_path)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MI50CTL, "tensile", *args, "--rocm-path", str(prefix),
                               "--config-dir", str(tmp_path / "none")],
                              capture_output=True, text=True, check=False, timeout=300)

    shown = ctl("status")
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[:3] == [f"ROCm 7.0.2 at {prefix}",
                                             f"rocBLAS library: {prefix / LIBRARY}",
                                             "gfx906 files: 0"]
    done = ctl("install", str(unpacked))
    assert done.returncode == 0, done.stderr
    assert f"installed {GFX906_FILES} gfx906 files from {unpacked}" in done.stdout
    assert done.stdout.splitlines()[-1].startswith(f"✓ rocblas: {GFX906_FILES} gfx906 Tensile")
    again = ctl("install", str(unpacked))
    assert again.returncode == 1 and again.stderr.startswith("Error: ")
    assert "Traceback" not in again.stderr
    doc = json.loads(ctl("status", "--json").stdout)
    assert doc["installed_by_mi50d"] == GFX906_FILES
    gone = ctl("uninstall")
    assert gone.returncode == 0 and f"removed {GFX906_FILES} files" in gone.stdout
    assert gone.stdout.splitlines()[-1].startswith("✗ rocblas: ")


def sid_root() -> Path:
    """The Debian sid root with ROCm 7.2.4 that the HIP build test builds (tests/systemd, opt-in)."""
    roots = sorted(Path.home().glob(".cache/mi50d/rootfs/sid-rocm-*/usr/lib/x86_64-linux-gnu/"
                                    "librocblas.so.5"))
    if not roots:
        pytest.skip("no sid-rocm root (built by the HIP build test)")
    return roots[0].parents[3]


def test_the_sid_root_has_them_and_is_left_alone(rocblas_deb: Path) -> None:
    root = sid_root()
    found, library = tensile.locate(root / "opt" / "rocm", {})
    assert found.layout == "distribution" and library == root / DEB_LIBRARY
    assert rocblas(found.prefix) == "ok"
    before = snapshot(library)
    with pytest.raises(tensile.TensileError, match=f"already has {GFX906_FILES} gfx906 files"):
        tensile.install(rocblas_deb, library)
    assert snapshot(library) == before
    assert tensile.status(library)["files"] == GFX906_FILES


def test_from_a_tarball_laid_out_like_amds_tree(unpacked: Path, tmp_path: Path) -> None:
    """A .tar.gz holding opt/rocm-6.4.4/lib/rocblas/library/ (AMD's layout) with some of the
    real files, plus a gfx906-named file outside any library directory, which is not taken."""
    chosen = sorted(unpacked.glob("*gfx906*"), key=lambda p: p.stat().st_size)[:5]
    tarball = tmp_path / "rocblas-6.4.4.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for f in chosen:
            tar.add(f, arcname=f"opt/rocm-6.4.4/lib/rocblas/library/{f.name}")
        tar.add(chosen[0], arcname="opt/rocm-6.4.4/share/doc/notes-gfx906.txt")
    library = amd_tree(tmp_path / "t") / LIBRARY
    done = tensile.install(tarball, library)
    assert sorted(done.files) == sorted(f.name for f in chosen)
    assert done.source.package is None
    assert not (library / "notes-gfx906.txt").exists()
    zst = tmp_path / "rocblas.tar.zst"
    zst.touch()
    tensile.uninstall(library)
    with pytest.raises(tensile.TensileError, match="zstd-compressed tar archives are not read"):
        tensile.install(zst, library)
