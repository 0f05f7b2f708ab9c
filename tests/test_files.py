"""mi50d.host.files.read_text on procfs: one read(2) there returns about a page, so a file longer
than that (mountinfo in a container with many mounts) must be read to its end."""

from __future__ import annotations

from pathlib import Path

from mi50d.host.files import read_text


def test_a_procfs_file_longer_than_a_page_is_read_whole() -> None:
    # A Python process maps dozens of files: its maps file is several pages long.
    text = read_text(Path("/proc/self/maps"))
    assert len(text.encode()) > 8192
    assert text.endswith("\n")
    assert all(len(line.split()) >= 5 for line in text.splitlines())
