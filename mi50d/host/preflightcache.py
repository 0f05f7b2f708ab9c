"""What preflight remembers between starts: the checks whose answer cannot have changed.

Preflight runs before every start and respawn, and three of its checks cost a child process
each (~15-20 ms): the binary's `--version`, its `--list-devices`, and, for a root daemon, the
access checks made as the instance's account. Their answers depend only on files, so a good
answer is remembered under the identity of every file it depends on (device, inode, size,
mtime, ctime, mode and owner, as `ggufmeta` keys a header; for the directories above it, what
decides search permission), the account's ids and the child's
argv and environment. Any change to one of those (a rebuild, a chmod or setfacl anywhere up the
path, which moves ctime, a new GPU node, a ROCm upgrade) makes a new key, and the check runs
again. Failures are never remembered: a fixed problem is seen at the next start.

For an access check the identity covers the path and each directory above it, as written and as
resolved through symlinks, since search permission on each of them decides. Every check still
runs as before; only its child is skipped while nothing it depends on has changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mi50d.config import HostPaths
from mi50d.host.access import Mode, RunResult, check_access, run_as
from mi50d.host.accounts import Account

MAX_ENTRIES = 256
Stamp = tuple[int, int, int, int, int, int, int, int] | None

_ACCESS: set[tuple[object, ...]] = set()
_RUNS: dict[tuple[object, ...], RunResult] = {}


def stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
            st.st_uid, st.st_gid)


def search_stamp(directory: str) -> tuple[object, ...] | None:
    """What decides who may search a directory: its identity, mode, owner and access ACL. Not
    its mtime, size or ctime, which move whenever an entry is added or removed (a directory like
    /tmp changes many times a second), while a chmod or setfacl changes one of these."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    try:
        acl: bytes | None = os.getxattr(directory, "system.posix_acl_access")
    except OSError:  # none set, or a file system without ACLs
        acl = None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid, acl)


def path_stamps(path: Path) -> tuple[tuple[str, object], ...]:
    """The path itself (its full stamp) and every directory above it (what decides search
    permission), as written and as resolved."""
    absolute = os.path.abspath(path)
    seen: dict[str, object] = {}
    for start in (absolute, os.path.realpath(absolute)):
        if start not in seen:
            seen[start] = stamp(Path(start))
        part, parent = os.path.dirname(start), start
        while part != parent:
            if part not in seen:
                seen[part] = search_stamp(part)
            part, parent = os.path.dirname(part), part
    return tuple(sorted(seen.items()))


def _who(account: Account | None) -> tuple[object, ...]:
    if account is None:
        return ("self", os.getuid(), os.getgid(), tuple(sorted(os.getgroups())))
    return (account.uid, account.gid, tuple(sorted(account.groups)))


def _remember(store: set[tuple[object, ...]] | dict[tuple[object, ...], RunResult]) -> None:
    if len(store) >= MAX_ENTRIES:
        store.clear()


def cached_access(account: Account | None,
                  requests: Sequence[tuple[Path, Mode]]) -> list[str | None]:
    """`access.check_access`, skipping the child for requests allowed before under the same
    identities."""
    who = _who(account)
    keys = [(who, mode, path_stamps(path)) for path, mode in requests]
    results: list[str | None] = [None] * len(requests)
    missing = [i for i, key in enumerate(keys) if key not in _ACCESS]
    if missing:
        fresh = check_access(account, [requests[i] for i in missing])
        for i, result in zip(missing, fresh, strict=True):
            results[i] = result
            if result is None:
                _remember(_ACCESS)
                _ACCESS.add(keys[i])
    return results


def runtime_files(binary: Path) -> list[Path]:
    """What a llama-server's answers depend on besides itself: the shared libraries beside it
    and in the prefix's lib/ (where builds put them), and those directories (a library added or
    removed changes this list itself)."""
    real = Path(os.path.realpath(binary))
    dirs = [real.parent, real.parent.parent / "lib"]
    libs = [p for d in dirs if d.is_dir() for p in sorted(d.glob("*.so*"))]
    return [*dirs, *libs]


def device_files(host: HostPaths) -> list[Path]:
    """What `--list-devices` depends on: the device nodes, the KFD topology and ROCm itself."""
    nodes = host.sysfs_root / "class/kfd/kfd/topology/nodes"
    found = sorted(nodes.iterdir()) if nodes.is_dir() else []
    return [host.dev_root / "kfd", host.dev_root / "dri", nodes, *found, host.rocm_path,
            Path(os.path.realpath(host.rocm_path))]


def cached_run(account: Account | None, argv: Sequence[str], env: Mapping[str, str],
               timeout_s: float, depends: Iterable[Path] = ()) -> RunResult:
    """`access.run_as`, answered from memory when it succeeded before with the same argv,
    environment and account, and neither the binary nor anything in `depends` changed."""
    key = (_who(account), tuple(argv), tuple(sorted(env.items())), path_stamps(Path(argv[0])),
           tuple((str(p), search_stamp(str(p)) if p.is_dir() else stamp(p)) for p in depends))
    known = _RUNS.get(key)
    if known is not None:
        return known
    result = run_as(account, argv, env, timeout_s)
    if result.ok:
        _remember(_RUNS)
        _RUNS[key] = result
    return result


def forget() -> None:
    """Drop everything remembered (for benchmarks measuring the uncached cost)."""
    _ACCESS.clear()
    _RUNS.clear()
