"""mi50d's .deb for one Debian release, built from the repository's files and cached by their hash.

The package is a dh-virtualenv venv tied to the python3 minor version it was built with
(debian/rules pins it), so each release needs its own build: on the host's own release the host
runs `dpkg-buildpackage -us -uc -b` (on a copy of the files, so nothing lands in or beside the
work tree); for another release (trixie's python3 is 3.13, bookworm's 3.11) it runs in a cached
build root of that release (`builder_recipe`), where pip fetches the wheels for that Python
through the host's certificate bundle and index settings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.systemd import rootfs

# debian/control's Build-Depends, and what dpkg-buildpackage assumes (build-essential).
BUILD_DEPENDS = ("debhelper", "dh-virtualenv", "python3", "python3-venv", "python3-dev",
                 "build-essential", "ca-certificates")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
CA_IN_ROOT = "/etc/ssl/certs/host-ca-bundle.crt"
SRC_IN_ROOT = "/build/mi50d"


def host_suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return ""


def builder_recipe(suite: str) -> rootfs.Recipe:
    return rootfs.Recipe(name=f"debbuild-{suite}", suite=suite, include=BUILD_DEPENDS)


def _source_files(repo: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, check=True, capture_output=True,
    ).stdout.decode()
    return sorted(p for p in out.split("\0") if p and (repo / p).is_file())


def source_key(repo: Path) -> str:
    digest = hashlib.sha256()
    for rel in _source_files(repo):
        path = repo / rel
        digest.update(rel.encode() + b"\0")
        digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _pip_env() -> dict[str, str]:
    """The host's pip settings (index, certificate) for a build in a root."""
    env = {"PIP_CERT": CA_IN_ROOT, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_DEFAULT_TIMEOUT": "180"}
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _dpkg_buildpackage(src: Path, root: Path | None) -> subprocess.CompletedProcess[str]:
    argv = ["dpkg-buildpackage", "-us", "-uc", "-b"]
    if root is None:
        return subprocess.run(argv, cwd=src, capture_output=True, text=True, check=False)
    return rootfs.run_in(root, argv, env=_pip_env(), binds={src.parent: str(Path(SRC_IN_ROOT).parent)},
                         ro_binds={HOST_CA: CA_IN_ROOT}, cwd=SRC_IN_ROOT, timeout=1800)


def build_deb(repo: Path, suite: str | None = None) -> Path:
    """Build the .deb for `suite` (default: the host's) from the repository's files; cached by
    their content (rebuilt on change)."""
    suite = suite or host_suite()
    key = source_key(repo)
    native = suite == host_suite()
    out_dir = rootfs.cache_root() / "deb" / (key if native else f"{suite}-{key}")
    debs = sorted(out_dir.glob("mi50d_*.deb"))
    if debs:
        return debs[-1]
    # The build root first: building it takes minutes, and the lock below is shared.
    root = None if native else rootfs.cached_root(builder_recipe(suite))
    with rootfs.locked(out_dir.parent / ".lock"):
        debs = sorted(out_dir.glob("mi50d_*.deb"))
        if debs:
            return debs[-1]
        with tempfile.TemporaryDirectory(prefix="mi50d-deb-") as tmp:
            src = Path(tmp) / "mi50d"
            for rel in _source_files(repo):
                dest = src / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(repo / rel, dest, follow_symlinks=False)
            proc = _dpkg_buildpackage(src, root)
            if proc.returncode != 0:
                raise RuntimeError(f"dpkg-buildpackage ({suite}) failed:\n"
                                   f"{(proc.stdout + proc.stderr)[-6000:]}")
            built = sorted(Path(tmp).glob("mi50d_*.deb"))
            if not built:
                raise RuntimeError("dpkg-buildpackage succeeded but wrote no mi50d_*.deb")
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
            for deb in built:
                shutil.copy2(deb, staging / deb.name)
            staging.rename(out_dir)
            builds = [p for p in out_dir.parent.iterdir() if p.is_dir() and p.name[0] != "."]
            newest = sorted(builds, key=lambda p: p.stat().st_mtime)[-6:]
            rootfs.prune(out_dir.parent, "*", keep={out_dir, *newest})
        return sorted(out_dir.glob("mi50d_*.deb"))[-1]
