"""Real Debian package files for tests, fetched once with apt and cached under
~/.cache/mi50d/debs/<package>/<version>/.

The packages come from Debian sid and experimental, which this (bookworm) machine's apt does not
list: a private apt configuration under ~/.cache/mi50d/apt-sid/ (its own sources.list, lists and
archive cache, passed with -o options) finds them without touching the machine's sources. apt
checks each file against the archive's signed index, as for any download.
"""

from __future__ import annotations

import fcntl
import getpass
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CACHE = Path.home() / ".cache" / "mi50d"
MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# The rocBLAS whose gfx906 Tensile files the tests install (in experimental as of 2026-12).
ROCBLAS = ("librocblas5", "7.2.4-1~exp1")
APT_TIMEOUT_S = 1800


def _apt_options(apt: Path) -> list[str]:
    return ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={apt / 'sources.list.d'}",
            "-o", f"Dir::State::Lists={apt / 'lists'}",
            "-o", f"Dir::Cache::Archives={apt / 'archives'}",
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Acquire::Check-Valid-Until=false",
            # downloads into our own cache: apt's _apt user could not write there
            "-o", f"APT::Sandbox::User={getpass.getuser()}"]


def _run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=APT_TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def _private_apt() -> Path:
    apt = CACHE / "apt-sid"
    for sub in ("lists/partial", "archives/partial", "sources.list.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(
        "".join(f"deb [signed-by={KEYRING}] {MIRROR} {suite} main\n"
                for suite in ("sid", "experimental")))
    return apt


def cached_deb(package: str, version: str) -> Path:
    """The .deb of `package` at `version`, downloaded on first use (a minute or two)."""
    home = CACHE / "debs" / package / version
    home.mkdir(parents=True, exist_ok=True)
    with (CACHE / "debs" / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download even with parallel test runs
        found = sorted(home.glob(f"{package}_*.deb"))
        if found:
            return found[0]
        if shutil.which("apt-get") is None:
            pytest.skip(f"apt-get is needed to fetch {package} {version}")
        apt = _private_apt()
        options = _apt_options(apt)
        _run(["apt-get", *options, "update"], apt)
        partial = Path(tempfile.mkdtemp(prefix=".download-", dir=home))
        try:
            _run(["apt-get", *options, "download", f"{package}={version}"], partial)
            (deb,) = partial.glob(f"{package}_*.deb")
            deb.rename(home / deb.name)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return home / deb.name
