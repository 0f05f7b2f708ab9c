"""Reading the files of a rocBLAS package for `mi50d.host.tensile`: a .deb (its ar archive and
data.tar read by Python's tarfile, streamed; zstd data through dpkg-deb), a .tar(.gz/.xz/.bz2),
or a directory. Only regular files named `*<target>*` inside a `rocblas/.../library` directory are
taken (or directly in a directory given as the source), each written under its base name into the
caller's staging directory; the gfx targets passed over are collected for the error message.
"""

from __future__ import annotations

import fnmatch
import io
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tar.zst")
CHUNK = 1 << 20
_GFX = re.compile(r"gfx[0-9a-f]+")


class TensileError(Exception):
    """Something the user can fix; the message names the file and the fix."""


@dataclass(frozen=True)
class Source:
    """What the files came from: the path and, for a package, its name and version."""

    path: Path
    package: str | None = None
    version: str | None = None

    def describe(self) -> str:
        return f"{self.package} {self.version} ({self.path})" if self.package else str(self.path)


def _wanted(member_path: str, target: str, seen: set[str] | None = None) -> bool:
    """A file of rocBLAS's library directory for `target`: `.../rocblas/.../library/*gfx906*`;
    the gfx targets of the library files passed over are added to `seen`."""
    parts = Path(member_path).parts
    if not (len(parts) >= 2 and parts[-2] == "library" and "rocblas" in parts):
        return False
    if seen is not None:
        seen.update(_GFX.findall(parts[-1]))
    return fnmatch.fnmatchcase(parts[-1], f"*{target}*")


def extract(source: Path, staging: Path, target: str, seen: set[str]) -> Source:
    if source.is_dir():
        _from_directory(source, staging, target, seen)
        return Source(source)
    name = source.name
    if name.endswith(".deb"):
        return _from_deb(source, staging, target, seen)
    if name.endswith(_TAR_SUFFIXES):
        with source.open("rb") as f:
            _from_tar(f, source, staging, target, _tar_mode(name), seen)
        return Source(source)
    if name.endswith(".rpm"):
        raise TensileError(f"{source}: .rpm packages are not read; unpack it (rpm2cpio "
                           f"{name} | cpio -idm) and pass the directory")
    raise TensileError(f"{source}: not a .deb, a .tar(.gz/.xz/.bz2) or a directory")


def _from_directory(source: Path, staging: Path, target: str, seen: set[str]) -> None:
    """Files of a rocBLAS library directory anywhere below `source`, or in `source` itself."""
    for path in sorted(source.rglob("*gfx*")):
        direct = path.parent == source
        if direct:
            seen.update(_GFX.findall(path.name))
        wanted = _wanted(str(path), target, seen) or (
            direct and fnmatch.fnmatchcase(path.name, f"*{target}*"))
        if not path.is_file() or not wanted:
            continue
        if (staging / path.name).exists():
            raise TensileError(f"{source} has two files named {path.name}; pass the one "
                               "rocblas/library directory you mean")
        shutil.copyfile(path, staging / path.name)


def _from_deb(source: Path, staging: Path, target: str, seen: set[str]) -> Source:
    package: dict[str, str] = {}
    found_data = False
    with source.open("rb") as f:
        for member, size in _ar_members(f, source):
            if member.startswith("control.tar"):
                package = _control(f.read(size), source)
            elif member.startswith("data.tar"):
                found_data = True
                if member.endswith(".zst"):
                    _from_dpkg_deb(source, staging, target, seen)
                else:
                    _from_tar(io.BufferedReader(_Bounded(f, size), CHUNK), source, staging,
                              target, _tar_mode(member, stream=True), seen)
    if not found_data:
        raise TensileError(f"{source}: a .deb without data.tar (corrupt or not a package)")
    return Source(source, package.get("Package"), package.get("Version"))


def _ar_members(f: IO[bytes], source: Path) -> Iterator[tuple[str, int]]:
    """(name, size) of each member of an ar archive, `f` left at the member's data; the caller
    may read it, the next step seeks past it."""
    if f.read(8) != b"!<arch>\n":
        raise TensileError(f"{source}: not a Debian package (no ar archive header): corrupt or "
                           "not a .deb; download it again")
    while True:
        header = f.read(60)
        if not header:
            return
        if len(header) != 60 or header[58:60] != b"`\n":
            raise TensileError(f"{source}: truncated or corrupt ar archive; download it again")
        try:
            size = int(header[48:58].decode().strip())
        except ValueError:
            raise TensileError(f"{source}: corrupt ar member header; download it again") from None
        start = f.tell()
        yield header[:16].decode(errors="replace").strip().rstrip("/"), size
        f.seek(start + size + size % 2)


def _control(data: bytes, source: Path) -> dict[str, str]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                if Path(member.name).name == "control" and member.isfile():
                    text = tar.extractfile(member)
                    assert text is not None
                    return dict(line.split(": ", 1) for line in text.read().decode(
                        errors="replace").splitlines() if ": " in line and line[:1] != " ")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise TensileError(f"{source}: corrupt control archive ({exc}); download it again") from None
    return {}


def _tar_mode(name: str, stream: bool = False) -> str:
    sep = "|" if stream else ":"
    for suffix, kind in ((".gz", "gz"), (".tgz", "gz"), (".xz", "xz"), (".txz", "xz"),
                         (".bz2", "bz2")):
        if name.endswith(suffix):
            return f"r{sep}{kind}"
    if name.endswith(".zst"):
        raise TensileError(f"{name}: zstd-compressed tar archives are not read; unpack it "
                           "(tar --zstd -xf) and pass the directory")
    return f"r{sep}"


def _from_tar(f: IO[bytes], source: Path, staging: Path, target: str, mode: str,
              seen: set[str]) -> None:
    """Stream through a tar archive, writing the wanted regular files into `staging`."""
    try:
        with tarfile.open(fileobj=f, mode=mode) as tar:  # type: ignore[call-overload]
            for member in tar:
                if not (member.isfile() and _wanted(member.name, target, seen)):
                    continue
                data = tar.extractfile(member)
                assert data is not None
                with (staging / Path(member.name).name).open("wb") as out:
                    shutil.copyfileobj(data, out, CHUNK)
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise TensileError(f"{source}: corrupt or truncated archive ({exc}); download it "
                           "again; nothing was changed") from None
    except OSError as exc:
        if exc.errno is None:  # lzma/zlib decoding errors carry no errno
            raise TensileError(f"{source}: corrupt or truncated archive ({exc}); download it "
                               "again; nothing was changed") from None
        raise


def _from_dpkg_deb(source: Path, staging: Path, target: str, seen: set[str]) -> None:
    tool = shutil.which("dpkg-deb")
    if tool is None:
        raise TensileError(f"{source}: its data is zstd-compressed and needs dpkg-deb; unpack it "
                           "(dpkg-deb -x) and pass the directory")
    with subprocess.Popen([tool, "--fsys-tarfile", str(source)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        _from_tar(proc.stdout, source, staging, target, "r|", seen)
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise TensileError(f"{source}: dpkg-deb failed: {err.decode(errors='replace').strip()}")


class _Bounded(io.RawIOBase):
    """The next `size` bytes of `f`, as a stream of their own."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._f.read(min(len(view), self._left))
        view[: len(data)] = data
        self._left -= len(data)
        return len(data)
