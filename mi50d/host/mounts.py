"""Mounts from `/proc/self/mountinfo`: which mount holds a path, and what its options mean for us.

The seed guide's first trap: models on an NTFS disk at /mnt/ssd mounted `noexec` (llama-server
there cannot run) or with uid/gid/umask options that make files unreadable to the service account.
This module owns parsing mountinfo (path from `HostPaths.mountinfo`) and the one-line hints.
Standard library only (mountinfo is read through `mi50d.host.files`, which never blocks).

A mountinfo line (proc(5)):
  36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
  id parent dev root mount-point mount-options optional-fields... - fstype source super-options
Space, tab, newline and backslash in paths are written as octal escapes (\\040 \\011 \\012 \\134).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mi50d.host.files import read_text

# File systems whose owner and mode bits come from mount options, not from the files.
FOREIGN_FS = frozenset({"ntfs", "ntfs3", "fuseblk", "vfat", "exfat", "msdos"})
_OCTAL = re.compile(r"\\([0-7]{3})")


class MountinfoError(Exception):
    pass


def unescape(field: str) -> str:
    """Decode mountinfo's octal escapes: `/mnt/my\\040disk` -> `/mnt/my disk`."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    root: str
    mount_point: PurePosixPath
    options: frozenset[str]
    fstype: str
    source: str
    super_options: Mapping[str, str | None]

    @property
    def noexec(self) -> bool:
        return "noexec" in self.options

    @property
    def readonly(self) -> bool:
        return "ro" in self.options

    @property
    def foreign(self) -> bool:
        """NTFS/FAT-like: permissions come from uid=/gid=/umask= options."""
        return self.fstype in FOREIGN_FS

    def option_int(self, *names: str) -> int | None:
        """The first of `names` among the super options as an int (umask in octal)."""
        for name in names:
            value = self.super_options.get(name)
            if value is not None:
                try:
                    return int(value, 8 if "mask" in name else 10)
                except ValueError:
                    return None
        return None


def parse_line(line: str) -> Mount:
    fields = line.split()
    try:
        sep = fields.index("-", 6)
        fstype, source, supers = fields[sep + 1], fields[sep + 2], fields[sep + 3]
        return Mount(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            root=unescape(fields[3]),
            mount_point=PurePosixPath(unescape(fields[4])),
            options=frozenset(fields[5].split(",")),
            fstype=fstype,
            source=unescape(source),
            super_options=_options(supers),
        )
    except (ValueError, IndexError):
        raise MountinfoError(f"unexpected mountinfo line: {line.strip()!r}") from None


def _options(text: str) -> dict[str, str | None]:
    result: dict[str, str | None] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        result[unescape(key)] = unescape(value) if eq else None
    return result


def read_mounts(mountinfo: Path) -> list[Mount]:
    """All mounts, in mount order (a later mount on the same point hides an earlier one)."""
    text = read_text(mountinfo)  # configurable: never block on a FIFO there
    return [parse_line(line) for line in text.splitlines() if line.strip()]


def mount_of(path: Path | str, mounts: Sequence[Mount]) -> Mount:
    """The mount holding `path` (made absolute and resolved as far as it exists): the longest
    mount point that is a prefix; among equal ones, the last mounted."""
    target = PurePosixPath(os.path.realpath(path))
    best: Mount | None = None
    for m in mounts:
        holds = target == m.mount_point or m.mount_point in target.parents
        if holds and (best is None or len(m.mount_point.parts) >= len(best.mount_point.parts)):
            best = m
    if best is None:
        raise MountinfoError(f"no mount in mountinfo holds {target}")
    return best


def is_mount_point(path: Path | str, mounts: Sequence[Mount]) -> bool:
    target = PurePosixPath(os.path.realpath(path))
    return any(m.mount_point == target for m in mounts)


def noexec_fix(mount: Mount) -> str:
    point = mount.mount_point
    return (f"remount with exec: mount -o remount,exec {point}, and add exec to its /etc/fstab "
            f"line (or move the binary off {point})")


def foreign_hint(mount: Mount, uid: int, gid: int, st: os.stat_result | None = None) -> str | None:
    """Why an account cannot read a file on an NTFS/FAT mount, with the fstab fix; None when the
    mount is not one whose permissions come from mount options.

    ntfs-3g (fuseblk) applies uid=/gid=/umask= itself, so they are not in mountinfo: the owner
    and mode the kernel reports for the file (`st`) are what those options produced."""
    if not mount.foreign:
        return None
    point = mount.mount_point
    if mount.fstype == "fuseblk" and "allow_other" not in mount.super_options:
        return (f"{point} is a FUSE (ntfs-3g) mount without allow_other, so only the account "
                f"that mounted it can read it; add allow_other to its /etc/fstab options, remount")
    if st is not None:
        found = f"files owned by uid {st.st_uid} gid {st.st_gid} mode {st.st_mode & 0o777:03o}"
    else:
        owner = mount.option_int("uid", "user_id")
        umask = mount.option_int("umask", "fmask")
        found = f"uid={owner} umask={'none' if umask is None else f'{umask:03o}'}"
    return (f"{point} is {mount.fstype}: owners and modes come from its mount options ({found}); "
            f"add uid={uid},gid={gid},umask=022 to its /etc/fstab options and remount")
