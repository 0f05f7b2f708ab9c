"""Real mounts for tests (we run as root): a noexec tmpfs and an NTFS image through ntfs-3g.

Each context manager mounts, yields the mount point and always unmounts; it skips the test with
the reason when this host cannot mount (not root, no ntfs-3g, no loop device)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


@contextmanager
def tmpfs(point: Path, options: str = "noexec") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"{options},size=16m", "tmpfs", str(point))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield point
    finally:
        _run("umount", str(point))


@contextmanager
def ntfs(point: Path, image: Path, options: str) -> Iterator[Path]:
    """An NTFS file system in `image` on a loop device, mounted by ntfs-3g (fstype fuseblk)."""
    if os.geteuid() != 0:
        pytest.skip("mounting NTFS needs root")
    if not (shutil.which("mkntfs") and shutil.which("ntfs-3g") and shutil.which("losetup")):
        pytest.skip("ntfs-3g (mkntfs, ntfs-3g) or losetup is not installed")
    with image.open("wb") as f:
        f.truncate(8 << 20)
    if _run("mkntfs", "-F", "-Q", str(image)).returncode != 0:
        pytest.skip("mkntfs failed")
    loop = _run("losetup", "-f", "--show", str(image))
    if loop.returncode != 0:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    point.mkdir(parents=True, exist_ok=True)
    try:
        done = _run("ntfs-3g", "-o", options, device, str(point))
        if done.returncode != 0:
            pytest.skip(f"ntfs-3g cannot mount here: {done.stderr.strip()}")
        try:
            yield point
        finally:
            _run("umount", str(point))
    finally:
        _run("losetup", "-d", device)
