"""What a configured path is, without ever blocking on it: a regular file, or one line saying
what it is instead (missing, a dangling link, a symlink loop, behind a directory that cannot be
searched, a directory, a FIFO, a device) with the fix that fits that case. Also small text files
(mountinfo, sysfs) read without blocking and up to a size limit.

Only stat(2) and lstat(2) are used, and files are opened with O_NONBLOCK: opening a FIFO for
reading would otherwise wait for a writer forever.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

_KINDS = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
MAX_TEXT = 4 << 20


@dataclass(frozen=True)
class PathProblem:
    message: str
    fix: str


def kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def file_problem(path: Path, key: str, want: str, missing_fix: str,
                 who: str) -> PathProblem | None:
    """None when `path` (links followed) is a regular file. `key` is the setting that names it,
    `want` what it should point at ("the .gguf file"), `who` the account doing the lookup."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return _lookup_problem(path, exc, key, missing_fix, who)
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return PathProblem(f"{path} is a directory, not a file", f"point {key} at {want} in it")
    kind = kind_of(st.st_mode)
    return PathProblem(f"{path} is not a regular file (a {kind})",
                       f"point {key} at {want} itself; a {kind} cannot be loaded")


def _lookup_problem(path: Path, exc: OSError, key: str, missing_fix: str,
                    who: str) -> PathProblem:
    if exc.errno == errno.ENOENT:
        try:
            target = os.readlink(path)
        except OSError:
            return PathProblem(f"{path} does not exist", missing_fix)
        return PathProblem(f"{path} is a symlink to {target}, which does not exist",
                           f"fix the link (ln -sfn TARGET {path}) or {key}")
    if exc.errno == errno.ELOOP:
        return PathProblem(f"{path} is a symlink loop (links that lead back to themselves)",
                           f"replace the link with one that ends at a file: ls -l {path}")
    if exc.errno == errno.EACCES:
        return PathProblem(f"{who} cannot look up {path}: a directory above it is not "
                           "searchable", f"give {who} search (x) permission on each directory "
                           f"above it; namei -l {path} shows which")
    if exc.errno == errno.ENOTDIR:
        return PathProblem(f"{path}: a part of the path is a file, not a directory",
                           f"fix {key}")
    return PathProblem(f"{path}: {exc.strerror or exc}", f"check {key} and the disk (dmesg)")


def read_text(path: Path, limit: int = MAX_TEXT) -> str:
    """A small text file, read without blocking on a FIFO; OSError for anything else than a
    regular file, or one over `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        # One read(2) of a procfs or sysfs file returns at most a page or so (seq_file): read
        # until end of file, as mountinfo on a host with many mounts is longer than that.
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = f.read(limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"over {limit} bytes", str(path))
    return data.decode("utf-8", errors="replace")
