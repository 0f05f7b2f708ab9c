"""mi50d.mounts on this host's real /proc/self/mountinfo, with real mounts made for the test."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest

from mi50d.mounts import (
    MountinfoError,
    foreign_hint,
    is_mount_point,
    mount_of,
    noexec_fix,
    parse_line,
    read_mounts,
    unescape,
)
from tests.realmounts import ntfs, tmpfs

MOUNTINFO = Path("/proc/self/mountinfo")


def test_noexec_tmpfs_with_a_space_in_its_name(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "my disk", "noexec,ro") as point:
        mounts = read_mounts(MOUNTINFO)
        inner = point / "models" / "x.gguf"  # need not exist
        m = mount_of(inner, mounts)
        assert m.mount_point == PurePosixPath(str(point))
        assert m.fstype == "tmpfs"
        assert m.noexec and m.readonly
        assert m.super_options["size"] == "16384k"
        assert is_mount_point(point, mounts)
        assert not is_mount_point(point / "models", mounts)
        assert f"mount -o remount,exec {point}" in noexec_fix(m)
        assert "/etc/fstab" in noexec_fix(m)
    # unmounted: the path now belongs to the mount above it, which is not noexec here
    after = mount_of(tmp_path / "my disk", read_mounts(MOUNTINFO))
    assert after.mount_point != PurePosixPath(str(tmp_path / "my disk"))


def test_overmount_last_one_wins(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "d", "exec"), tmpfs(tmp_path / "d", "noexec") as point:
        assert mount_of(point / "f", read_mounts(MOUNTINFO)).noexec


def test_symlink_into_a_mount_resolves(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as point:
        (tmp_path / "link").symlink_to(point)
        assert mount_of(tmp_path / "link" / "bin", read_mounts(MOUNTINFO)).noexec


def test_ntfs_3g_mount_is_foreign_and_the_hint_names_owner_and_mode(tmp_path: Path) -> None:
    with ntfs(tmp_path / "ssd", tmp_path / "ntfs.img", "uid=0,gid=0,umask=077") as point:
        model = point / "model.gguf"
        model.write_bytes(b"GGUF")
        m = mount_of(model, read_mounts(MOUNTINFO))
        assert m.fstype == "fuseblk" and m.foreign
        assert "allow_other" in m.super_options
        hint = foreign_hint(m, 65534, 65534, model.stat())
        assert hint is not None
        assert "uid 0 gid 0 mode 700" in hint
        assert "add uid=65534,gid=65534,umask=022" in hint


def test_parse_fuseblk_without_allow_other() -> None:
    line = ("50 27 8:17 / /mnt/ssd rw,nosuid,nodev,relatime shared:30 - fuseblk /dev/sdb1 "
            "rw,user_id=1000,group_id=1000,default_permissions,blksize=4096")
    m = parse_line(line)
    assert m.option_int("uid", "user_id") == 1000
    hint = foreign_hint(m, 998, 998)
    assert hint is not None and "allow_other" in hint


def test_parse_ntfs3_options_and_ext4_is_not_foreign() -> None:
    m = parse_line("61 27 259:3 / /mnt/data rw,noexec,relatime shared:33 master:2 - ntfs3 "
                   "/dev/nvme0n1p3 rw,uid=1000,gid=1000,umask=077,iocharset=utf8")
    assert m.noexec and m.foreign
    assert m.option_int("umask") == 0o77
    assert "umask=077" in (foreign_hint(m, 998, 998) or "")
    ext4 = parse_line("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw")
    assert foreign_hint(ext4, 998, 998) is None


def test_unescape_and_bad_lines() -> None:
    assert unescape(r"/mnt/a\040b\011c\134d") == "/mnt/a b\tc\\d"
    with pytest.raises(MountinfoError):
        parse_line("garbage")
    with pytest.raises(MountinfoError):
        mount_of("/x", [])


def test_real_root_mount_found() -> None:
    m = mount_of(os.getcwd(), read_mounts(MOUNTINFO))
    assert str(m.mount_point) in os.getcwd()
