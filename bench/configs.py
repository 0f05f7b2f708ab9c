"""Configuration directories for the benchmarks: N fake servers, or the real llama-server on a
generated model. Written with the test suite's own helpers (tests.support)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.procs import free_port
from mi50d.config import InstanceConfig, load_config
from mi50d.llama.source import build_root
from tests.support import fake_daemon, fake_env, write_config

# The CPU build the test suite makes with `mi50ctl build-llama` (tests/conftest.py).
LLAMA_SERVER = build_root() / "current" / "bin" / "llama-server"


def fake_dir(directory: Path, count: int, *, autostart: bool = False,
             interval_s: float = 5.0, **extra: Any) -> Path:
    """`count` fake llama-servers named f000.., each on its own free port."""
    health = {"interval_s": interval_s, "timeout_s": min(3.0, interval_s)}
    insts = {
        f"f{i:03d}": {"model": "/dev/null", "port": free_port(), "autostart": autostart,
                      "env": fake_env(), "health": health, "restart": {"delay_s": 0}, **extra}
        for i in range(count)
    }
    return write_config(directory, fake_daemon(), insts)


def one_dir(directory: Path, model: Path | None, *, autostart: bool = False, name: str = "tiny",
            preflight: bool = False, **extra: Any) -> Path:
    """One instance: the real llama-server on `model` (one thread, a small context, as the engine
    tests run it), or the fake server when `model` is None (for trying the benchmark out).
    With `preflight`, mi50d's checks run before every spawn (the default in mi50d.toml); the
    instance then says `n_gpu_layers = 0`, so a machine without GPUs passes them."""
    if model is None:
        daemon = fake_daemon(preflight=preflight)
        inst: dict[str, Any] = {"model": "/dev/null", "env": fake_env()}
    else:
        daemon = {"llama_server": str(LLAMA_SERVER), "preflight": preflight}
        inst = {"model": str(model), "ctx_size": 256, "threads": 1}
    if preflight:
        inst["n_gpu_layers"] = 0
    inst.update(port=free_port(), autostart=autostart, **extra)
    return write_config(directory, daemon, {name: inst})


def instance(directory: Path, name: str) -> tuple[list[str], dict[str, str], InstanceConfig]:
    """The exact argv and environment mi50d would launch `name` with."""
    config = load_config(directory)
    inst = config.instances[name]
    return inst.argv(config.daemon), inst.environment(os.environ), inst
