"""Installing rocBLAS's gfx906 Tensile files into a ROCm tree, and undoing it.

AMD's rocBLAS stopped shipping gfx906 kernels in ROCm 6.4, and a HIP llama-server on an MI50
then aborts at its first matrix multiply. Other rocBLAS builds still have them (Debian's
librocblas5, AMD's 6.3/6.4.x packages). `install` copies only the files named `*gfx906*` from
such a package (.deb, or a .tar/.tar.gz/.tar.xz) or from a directory into the library directory
rocBLAS reads (`mi50d.host.rocm.library_dirs`), and writes a manifest there, `.mi50d-tensile.json`,
naming each file with its SHA-256, so that `uninstall` removes exactly those and nothing else.

All or nothing: the files are first extracted into a staging directory inside the library
directory (same file system, so moving them in is a hard link), conflicts are checked before
anything moves, the manifest is written before the first file moves (a crash midway leaves a
manifest naming everything that may be there), and any error takes back what was moved. A file
that exists and was not installed by mi50d is never overwritten: a link never replaces a file.
One install or uninstall runs at a time per directory (flock on the directory).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mi50d.host import rocm
from mi50d.host.tensilepkg import CHUNK, Source, TensileError, extract

__all__ = ["Installed", "Removed", "Source", "TensileError", "install", "locate", "status",
           "uninstall", "version_mismatch"]

MANIFEST = ".mi50d-tensile.json"
STAGING_PREFIX = ".mi50d-tensile-staging-"
TARGET = "gfx906"


@dataclass(frozen=True)
class Installed:
    library: Path
    source: Source
    files: tuple[str, ...]


@dataclass(frozen=True)
class Removed:
    library: Path
    removed: tuple[str, ...]
    kept: tuple[str, ...]  # changed since they were installed: left in place


def locate(rocm_path: Path, env: Mapping[str, str]) -> tuple[rocm.Rocm, Path]:
    """The ROCm tree at (or found from) `rocm_path` and its rocBLAS library directory: the one
    next to its librocblas, else the layout's default. ROCBLAS_TENSILE_LIBPATH is not followed:
    files go into the tree, where every process finds them."""
    found = rocm.find_rocm(rocm_path, env)
    if found is None:
        raise TensileError(f"no ROCm at {rocm_path} (nor distribution packages in /usr, nor "
                           "hipconfig on PATH); give --rocm-path the ROCm tree to change")
    dirs = rocm.library_dirs(found)
    existing = [path for path, _ in dirs if path.is_dir()]
    return found, existing[0] if existing else dirs[0][0]


def version_mismatch(found: rocm.Rocm, package_version: str | None) -> str | None:
    """A warning when the package's major.minor is not the tree's: rocBLAS may not read Tensile
    files written for another rocBLAS."""
    if not package_version or found.version is None:
        return None
    numbers = re.match(r"(?:\d+:)?(\d+)\.(\d+)", package_version)
    if numbers is None:
        return None
    theirs = (int(numbers.group(1)), int(numbers.group(2)))
    if theirs == found.version.parts[:2]:
        return None
    return (f"the files are from rocBLAS {package_version} and this is ROCm {found.version}: "
            "rocBLAS may refuse Tensile files of another release; prefer a package of the same "
            "ROCm version if there is one")


def read_manifest(library: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((library / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise TensileError(f"{library / MANIFEST}: unreadable ({exc}); remove it by hand if "
                           "mi50d's files are gone") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise TensileError(f"{library / MANIFEST}: not a manifest written by mi50d")
    return record


def install(source: Path, library: Path, target: str = TARGET) -> Installed:
    """Copy `source`'s `*<target>*` files into `library`; raises TensileError."""
    if not library.is_dir():
        raise TensileError(f"{library} does not exist: rocBLAS is not installed in this tree "
                           "(install rocBLAS first, or give --rocm-path the tree that has it)")
    if not source.exists():
        raise TensileError(f"{source} does not exist")
    with _locked(library):
        return _install(source, library, target)


def _install(source: Path, library: Path, target: str) -> Installed:
    previous = read_manifest(library)
    if previous is not None:
        raise TensileError(f"{library} already has {len(previous['files'])} files mi50d "
                           f"installed from {previous.get('source')}; run mi50ctl tensile "
                           "uninstall first")
    present = sorted(p.name for p in library.glob(f"*{target}*"))
    if present:  # refused before reading the source: nothing to add, or files not ours
        raise TensileError(f"{library} already has {len(present)} {target} files not installed "
                           f"by mi50d (e.g. {present[0]}); nothing was changed. If rocBLAS "
                           "still fails, remove them first (they belong to another package)")
    with _staging(library) as staging:
        seen: set[str] = set()
        origin = extract(source, staging, target, seen)
        names = sorted(p.name for p in staging.iterdir())
        if not names:
            others = f" (it has {', '.join(sorted(seen))})" if seen else ""
            raise TensileError(f"{source} has no {target} Tensile files: nothing named "
                               f"*{target}* in a rocblas/.../library directory{others}; use a "
                               f"rocBLAS built for {target}, e.g. Debian's librocblas5")
        clash = [n for n in names if (library / n).exists() or (library / n).is_symlink()]
        if clash:
            raise TensileError(
                f"{library} already has {len(clash)} of these files, not installed by mi50d "
                f"(e.g. {clash[0]}); nothing was changed. They may be all rocBLAS needs: "
                "see mi50ctl doctor")
        files = {n: _sha256(staging / n) for n in names}
        manifest = {"version": 1, "target": target, "source": str(origin.path),
                    "package": origin.package, "package_version": origin.version,
                    "installed_at": datetime.datetime.now(datetime.UTC).isoformat(
                        timespec="seconds"),
                    "files": files}
        _write_manifest(library, manifest)
        moved: list[str] = []
        try:
            for name in names:
                os.link(staging / name, library / name)  # never replaces: EEXIST instead
                moved.append(name)
        except OSError as exc:
            for name in moved:
                (library / name).unlink()
            (library / MANIFEST).unlink()
            raise TensileError(f"moving {name} into {library} failed: {exc.strerror}; nothing "
                               "was changed") from None
    return Installed(library, origin, tuple(names))


def uninstall(library: Path) -> Removed:
    """Remove the files the manifest in `library` names, when unchanged, then the manifest."""
    with _locked(library):
        return _uninstall(library)


def _uninstall(library: Path) -> Removed:
    manifest = read_manifest(library)
    if manifest is None:
        raise TensileError(f"{library} has no {MANIFEST}: mi50d installed nothing there")
    removed: list[str] = []
    kept: list[str] = []
    with _staging(library) as trash:
        try:
            for name, digest in sorted(manifest["files"].items()):
                path = library / Path(name).name
                if not path.is_file():
                    continue
                if _sha256(path) != digest:
                    kept.append(path.name)
                    continue
                os.rename(path, trash / path.name)
                removed.append(path.name)
            (library / MANIFEST).unlink()
        except OSError as exc:
            for name in removed:
                os.rename(trash / name, library / name)
            raise TensileError(f"removing from {library} failed: {exc.strerror}; nothing was "
                               "changed") from None
    return Removed(library, tuple(removed), tuple(kept))


def status(library: Path, target: str = TARGET) -> dict[str, Any]:
    """What `library` holds for `target`, and what of it mi50d installed (and whether intact)."""
    present = sorted(p.name for p in library.glob(f"*{target}*")) if library.is_dir() else []
    manifest = read_manifest(library) if library.is_dir() else None
    ours = manifest["files"] if manifest else {}
    missing = sorted(n for n in ours if not (library / n).is_file())
    changed = sorted(n for n in ours if (library / n).is_file() and _sha256(library / n) != ours[n])
    return {"library": str(library), "exists": library.is_dir(), "target": target,
            "files": len(present), "installed_by_mi50d": len(ours),
            "source": manifest.get("source") if manifest else None,
            "package": manifest.get("package") if manifest else None,
            "package_version": manifest.get("package_version") if manifest else None,
            "installed_at": manifest.get("installed_at") if manifest else None,
            "missing": missing, "changed": changed}


# --- staging and writing -------------------------------------------------------------------------

@contextmanager
def _locked(library: Path) -> Iterator[None]:
    """One install or uninstall at a time per library directory (a lock on the directory
    itself, so nothing is left in the tree)."""
    fd = os.open(library, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _staging(library: Path) -> Iterator[Path]:
    try:
        path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=library))
    except OSError as exc:
        raise TensileError(_write_error(library, exc)) from None
    try:
        yield path
    except OSError as exc:
        raise TensileError(_write_error(library, exc) + "; nothing was changed") from None
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_error(library: Path, exc: OSError) -> str:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write to {library}: {why}; run it as root (sudo mi50ctl tensile ...)"
    if exc.errno == errno.EROFS:
        return (f"cannot write to {library}: {why}; remount it read-write, or give "
                "--rocm-path a writable ROCm tree")
    if exc.errno == errno.ENOSPC:
        return f"no space left in {library}'s file system ({why}); free some and retry"
    return f"cannot write to {library}: {why}"


def _write_manifest(library: Path, manifest: dict[str, Any]) -> None:
    partial = library / f"{MANIFEST}.partial"
    with partial.open("w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.rename(partial, library / MANIFEST)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


