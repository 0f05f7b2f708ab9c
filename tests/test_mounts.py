"""mi50d.host.mounts on this host's real /proc/self/mountinfo, with real mounts made for the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mi50d.host.mounts import (
    MountinfoError,
    foreign_hint,
    is_mount_point,
    mount_of,
    noexec_fix,
    parse_line,
    read_mounts,
    unescape,
)
from mi50d.host.mountunits import ensure_mounted, escape_path, mount_unit
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


# --- mi50d.host.mountunits: systemd path escaping and the D-Bus conversation -------------------------

SYSTEMD_ESCAPE = shutil.which("systemd-escape")
needs_escape = pytest.mark.skipif(SYSTEMD_ESCAPE is None, reason="systemd-escape not installed")


def real_escape(path: str) -> str:
    assert SYSTEMD_ESCAPE is not None
    done = subprocess.run([SYSTEMD_ESCAPE, "--path", "--", path], capture_output=True,
                          text=True, check=True)
    return done.stdout.rstrip("\n")


@needs_escape
@pytest.mark.parametrize("path", [
    "/", "//", "/./", "/mnt/ssd", "/mnt/ssd/", "/mnt//my disk", "/mnt/.hidden", "/.hidden",
    "/mnt/a-b", "/mnt/ü", "/mnt/./x", "/mnt/a\\b", "/mnt/x:y_z.w", "/mnt/$x", "/media/USB 1/",
    "/mnt/-lead", "/srv/模型",
])
def test_escape_matches_systemd_escape(path: str) -> None:
    assert escape_path(path) == real_escape(path)


_component = st.text(
    alphabet=st.sampled_from([*"abcXYZ019-_.:\\ \t~%@ü模", "é"]), min_size=1, max_size=8
).filter(lambda c: c != "..")


@needs_escape
@settings(max_examples=150, deadline=None)
@given(st.lists(_component, min_size=0, max_size=4), st.booleans())
def test_escape_matches_systemd_escape_generated(parts: list[str], trailing: bool) -> None:
    path = "/" + "/".join(parts) + ("/" if trailing else "")
    assert escape_path(path) == real_escape(path)


def test_escape_refuses_relative_and_dotdot() -> None:
    with pytest.raises(ValueError):
        escape_path("mnt/ssd")
    with pytest.raises(ValueError):
        escape_path("/mnt/../ssd")
    assert mount_unit(Path("/mnt/ssd")) == "mnt-ssd.mount"


def test_mounted_path_needs_no_dbus(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ssd") as point:
        check = ensure_mounted(point, lambda: read_mounts(MOUNTINFO),
                               bus_address="unix:path=/nonexistent/bus", timeout_s=5)
        assert check.status == "ok", check.line()


@pytest.fixture
def session_bus(tmp_path: Path) -> Iterator[str]:
    """A real dbus-daemon with a private bus: D-Bus works, systemd is not on it."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.skip("dbus-daemon not installed")
    proc = subprocess.Popen([daemon, "--session", "--nofork", "--print-address=1",
                             f"--address=unix:path={tmp_path}/bus"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_missing_mount_without_systemd_on_the_bus_fails_with_the_unit(
        tmp_path: Path, session_bus: str) -> None:
    point = tmp_path / "ssd"
    point.mkdir()
    check = ensure_mounted(point, lambda: read_mounts(MOUNTINFO), bus_address=session_bus,
                           timeout_s=10)
    unit = mount_unit(point)
    assert check.status == "fail"
    assert "systemd cannot be asked over D-Bus" in check.message
    assert "org.freedesktop.systemd1" in check.message  # the bus's own ServiceUnknown error
    assert check.fix is not None and f"systemctl start {unit}" in check.fix
    assert check.data["unit"] == unit


def test_missing_mount_without_any_bus(tmp_path: Path) -> None:
    check = ensure_mounted(tmp_path, lambda: read_mounts(MOUNTINFO),
                           bus_address=f"unix:path={tmp_path}/no-bus", timeout_s=5)
    assert check.status == "fail" and "D-Bus" in check.message
