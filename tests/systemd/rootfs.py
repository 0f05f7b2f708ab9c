"""Cached Debian roots built with debootstrap: one recipe per root, one cache directory per key.

A `Recipe` names a suite, what debootstrap includes, and optionally a second step run inside the
new root (apt sources, pins and `apt-get install`, for packages from another suite such as
ROCm from experimental). `cached_root(recipe)` builds it on first use under
`~/.cache/mi50d/rootfs/<name>-<key>/`, in a temporary directory renamed into place, so a
half-built root is never reused; the key (16 hex digits) hashes the whole recipe, so changing it
builds anew and older roots of exactly that name are pruned (names are prefixes of nothing else:
e2e-trixie, debbuild-trixie, sid-rocm).

What was installed is recorded in the root's `/etc/mi50d-root.json` (the recipe and
`dpkg-query -W` of every package): experimental moves, and what a root holds is then part of
any test output that prints it, and can key artefacts built in the root (`package_versions`).

`run_in(root, argv)` runs one command in a root with `systemd-nspawn` (no boot): writes go to a
throwaway overlay (`--volatile=overlay`), so the cache stays as built; `binds` bring host
directories in.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RECORD = "etc/mi50d-root.json"
# This mirror's Release files may be older than their Valid-Until (the machine's clock runs
# ahead of the snapshot); the host has the same setting.
NO_VALID_UNTIL = 'Acquire::Check-Valid-Until "false";\nAcquire::Check-Date "false";\n'


@dataclass(frozen=True)
class Recipe:
    name: str  # the cache directory's prefix
    suite: str
    include: tuple[str, ...] = ()  # debootstrap --include
    # Optional second step, inside the root: files written first (path -> text), then
    # `apt-get update` and `apt-get install --no-install-recommends` of `install`.
    apt_files: Mapping[str, str] = field(default_factory=dict)
    install: tuple[str, ...] = ()
    # Files written last (hostname, masked units as "@/dev/null" symlinks, ...).
    files: Mapping[str, str] = field(default_factory=dict)
    # Bump when the steps below change in a way the fields above do not show.
    version: int = 1

    def key(self) -> str:
        text = json.dumps([self.version, self.suite, MIRROR, self.include,
                           sorted(self.apt_files.items()), self.install,
                           sorted(self.files.items())])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mi50d"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise builders of one artefact (two pytest sessions, or xdist workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def root_path(recipe: Recipe) -> Path:
    return cache_root() / "rootfs" / f"{recipe.name}-{recipe.key()}"


def is_built(recipe: Recipe) -> bool:
    return (root_path(recipe) / RECORD).is_file()


def cached_root(recipe: Recipe) -> Path:
    """The root, built on first use (minutes; later calls are instant)."""
    final = root_path(recipe)
    with locked(final.with_name(final.name + ".lock")):
        if (final / RECORD).is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        tmp.chmod(0o755)  # it becomes the container's /
        try:
            timings = _build(recipe, tmp)
            _record(recipe, tmp, timings)
            tmp.rename(final)
            prune(final.parent, f"{recipe.name}-{'[0-9a-f]' * 16}", keep={final})
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return final


def _build(recipe: Recipe, root: Path) -> dict[str, float]:
    timings: dict[str, float] = {}
    started = time.monotonic()
    argv = ["debootstrap", "--variant=minbase"]
    if recipe.include:
        argv.append(f"--include={','.join(recipe.include)}")
    _check([*argv, recipe.suite, str(root), MIRROR], "debootstrap")
    timings["debootstrap_s"] = round(time.monotonic() - started, 1)
    if recipe.install:
        started = time.monotonic()
        _write(root, {"etc/apt/apt.conf.d/99no-valid-until": NO_VALID_UNTIL, **recipe.apt_files})
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        run_in(root, ["apt-get", "update"], env=env, persist=True, check=True, timeout=900)
        run_in(root, ["apt-get", "install", "-y", "--no-install-recommends", *recipe.install],
               env=env, persist=True, check=True, timeout=3600)
        timings["install_s"] = round(time.monotonic() - started, 1)
    _write(root, recipe.files)
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (root / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)
    return timings


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        if text.startswith("@"):
            path.symlink_to(text[1:])
        else:
            path.write_text(text)


def _record(recipe: Recipe, root: Path, timings: dict[str, float]) -> None:
    versions = run_in(root, ["dpkg-query", "-W", "-f", "${Package}\t${Version}\n"],
                      persist=True, check=True).stdout
    record = {"name": recipe.name, "suite": recipe.suite, "key": recipe.key(),
              "include": recipe.include, "install": recipe.install, "timings": timings,
              "packages": dict(line.split("\t", 1) for line in versions.splitlines() if line)}
    (root / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def record(root: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / RECORD).read_text())
    return data


def package_versions(root: Path, names: Sequence[str]) -> dict[str, str]:
    """The installed versions of `names` (absent ones left out), from the root's record."""
    packages = record(root)["packages"]
    assert isinstance(packages, dict)
    return {n: str(packages[n]) for n in names if n in packages}


def prune(directory: Path, pattern: str, keep: set[Path]) -> None:
    """Drop cached artefacts of older inputs (directories only; locks and temporaries stay)."""
    for path in directory.glob(pattern):
        if path.is_dir() and not path.name.startswith(".") and path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _check(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def nspawn_command(root: Path, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   binds: Mapping[Path, str] | None = None,
                   ro_binds: Mapping[Path, str] | None = None, tmpfs: Sequence[str] = (),
                   persist: bool = False, cwd: str | None = None,
                   as_pid1: bool = False) -> list[str]:
    """The systemd-nspawn command line that runs argv in `root` with a clean environment (PATH,
    LANG, HOME, env); writes go to a throwaway overlay unless `persist` (used while building).

    By default a stub init is PID 1 and reaps what the command leaves (a build's many
    children). `as_pid1` makes the command PID 1 itself, for a server that must see the SIGTERM
    nspawn passes on when it is terminated (the stub does not forward it)."""
    cmd = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", f"--directory={root}",
           "--pipe", "--kill-signal=SIGTERM"]
    if not as_pid1:
        cmd.append("--as-pid2")
    if not persist:
        cmd.append("--volatile=overlay")
    for host, inside in (binds or {}).items():
        cmd.append(f"--bind={host}:{inside}")
    for host, inside in (ro_binds or {}).items():
        cmd.append(f"--bind-ro={host}:{inside}")
    cmd += [f"--tmpfs={path}" for path in tmpfs]
    if cwd is not None:
        cmd.append(f"--chdir={cwd}")
    return [*cmd, "--", "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8",
            "HOME=/root", "TERM=dumb", *(f"{k}={v}" for k, v in (env or {}).items()), *argv]


def run_in(root: Path, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
           binds: Mapping[Path, str] | None = None, ro_binds: Mapping[Path, str] | None = None,
           tmpfs: Sequence[str] = (), persist: bool = False, check: bool = False,
           timeout: float = 600.0, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv in `root` (see nspawn_command) and wait for it."""
    cmd = nspawn_command(root, argv, env=env, binds=binds, ro_binds=ro_binds, tmpfs=tmpfs,
                         persist=persist, cwd=cwd)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)!r} in {root} exited {proc.returncode}:\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def stop(proc: subprocess.Popen[str], timeout_s: float = 20.0) -> int:
    """Stop an nspawn started with nspawn_command: SIGTERM (passed on to the command), then, if
    it does not end, SIGKILL to everything under nspawn first (killing nspawn alone would leave
    the container's processes running, re-parented to init), then to nspawn."""
    proc.terminate()
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        return proc.wait()


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        try:
            text = Path(f"/proc/{stack.pop()}/task").glob("*/children")
            children = [int(c) for f in text for c in f.read_text().split()]
        except OSError:
            children = []
        found += children
        stack += children
    return found
