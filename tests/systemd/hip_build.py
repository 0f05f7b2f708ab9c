"""`mi50ctl build-llama --backend hip --targets gfx906`, run for real in the sid ROCm root.

The project runs in the root from this repository (bind-mounted read-only at /srv/mi50d, on
PYTHONPATH), the llama.cpp source is bind-mounted read-only at /src/llama.cpp, and the build root
(`/var/lib/mi50d/llama`, build-llama's default as root) is a host directory:

    ~/.cache/mi50d/hip-build/<source>-<key>/

where the key hashes the versions of the toolchain packages installed in the root
(`rocm_root.TOOLCHAIN_PACKAGES`). A later run finds its earlier build there, and build-llama's
own fingerprint decides whether it is up to date (a change of build.py's plan rebuilds,
incrementally, in the kept work tree). `first-build.json` records what the first build cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tests.systemd import rootfs
from tests.systemd.rocm_root import RECIPE, TOOLCHAIN_PACKAGES

REPO_IN_ROOT = "/srv/mi50d"
SOURCE_IN_ROOT = "/src/llama.cpp"
BUILD_ROOT_IN_ROOT = "/var/lib/mi50d/llama"
BUILD_TIMEOUT_S = 3 * 3600.0
MI50CTL = ("python3", "-c", "import sys; from mi50ctl.cli import main; sys.argv[0] = 'mi50ctl'; "
           "main()")


@dataclass(frozen=True)
class HipBuild:
    root: Path  # the sid root
    build_root: Path  # the host directory mounted at BUILD_ROOT_IN_ROOT
    output: str  # what build-llama printed (its own lines and cmake's)
    returncode: int
    elapsed_s: float

    @property
    def bin_dir(self) -> Path:
        return self.build_root / "current" / "bin"


def toolchain_key(root: Path) -> str:
    versions = rootfs.package_versions(root, TOOLCHAIN_PACKAGES)
    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]


def build_root_for(root: Path, source: Path) -> Path:
    return rootfs.cache_root() / "hip-build" / f"{source.parent.name}-{toolchain_key(root)}"


def binds(root: Path, source: Path, repo: Path) -> tuple[dict[Path, str], dict[Path, str]]:
    """(read-write, read-only) bind mounts for commands in the root."""
    return ({build_root_for(root, source): BUILD_ROOT_IN_ROOT},
            {source: SOURCE_IN_ROOT, repo: REPO_IN_ROOT})


def skip_reason(source: Path) -> str | None:
    """Why the HIP tests do not run here, or None: they run by default (building the sid ROCm
    root and the gfx906 build when they are not cached); MI50D_TEST_HIP=0 turns them off."""
    if os.environ.get("MI50D_TEST_HIP", "") == "0":
        return "MI50D_TEST_HIP=0"
    missing = [t for t in ("debootstrap", "systemd-nspawn") if not shutil.which(t)]
    if missing or os.geteuid() != 0:
        return f"needs root and {', '.join(missing) or 'debootstrap, systemd-nspawn'}"
    return None


def build_llama(source: Path, repo: Path, *, jobs: int = 2) -> HipBuild:
    """Build (or find up to date) llama.cpp's HIP backend for gfx906 with the real build-llama."""
    root = rootfs.cached_root(RECIPE)
    out = build_root_for(root, source)
    rw, ro = binds(root, source, repo)
    with rootfs.locked(out.with_name(out.name + ".lock")):
        out.mkdir(parents=True, exist_ok=True)
        first = not (out / "current").exists()
        started = time.monotonic()
        proc = rootfs.run_in(
            root, ["nice", "-n", "5", *MI50CTL, "build-llama", "--backend", "hip",
                   "--targets", "gfx906", "--source", SOURCE_IN_ROOT, "-j", str(jobs)],
            env={"PYTHONPATH": REPO_IN_ROOT, "PYTHONDONTWRITEBYTECODE": "1"},
            binds=rw, ro_binds=ro, timeout=BUILD_TIMEOUT_S)
        elapsed = round(time.monotonic() - started, 1)
        output = proc.stdout + proc.stderr
        (out / "last-build.log").write_text(output)
        if first and proc.returncode == 0:
            (out / "first-build.json").write_text(json.dumps(
                {"elapsed_s": elapsed, "jobs": jobs,
                 "root_timings": rootfs.record(root)["timings"],
                 "toolchain": rootfs.package_versions(root, TOOLCHAIN_PACKAGES)}, indent=1) + "\n")
    return HipBuild(root, out, output, proc.returncode, elapsed)
