"""The demo's preparation: the llama.cpp source, a cached cpu llama-server build, a tiny model and
a config directory for `mi50d --config-dir` under ~/.cache/mi50d/demo/ (scripts/demo.sh).

Needs the `test` extra (gguf, numpy) for the model. `python -m mi50d.llama.demo` prepares everything,
sends cmake's progress to stderr and prints only the config directory on stdout.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys
from pathlib import Path
from typing import IO

from mi50d.llama import build, tinymodel
from mi50d.llama import source as llamasrc

PORT = 8090
INSTANCE = "tiny"
# The cpu build that the demo and most tests use: llama-server alone. A build with llama.cpp's
# RPC worker (GGML_RPC=ON) is another build, for the RPC tests: with the RPC backend compiled in,
# llama-server no longer warns that it ignores GPU offload ("no usable GPU found"), which is how a
# CPU build's silent fallback is recognised.
TOOLS = ("llama-server",)
RPC_TOOLS = ("llama-server", "rpc-server")


def socket_path() -> Path:
    return Path(f"/tmp/mi50d-demo-{os.geteuid()}.sock")


def write_config(directory: Path, llama_server: Path, model: Path) -> Path:
    """mi50d.toml and tiny.toml in `directory`: instances run as the current user (as root that
    is `user = "root"`, mi50d's explicit opt-in), and the socket's group is the user's own."""
    account = pwd.getpwuid(os.geteuid())
    group = grp.getgrgid(account.pw_gid).gr_name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mi50d.toml").write_text(
        "# The demo's daemon settings, written by scripts/demo.sh (mi50d.llama.demo).\n"
        f'llama_server = "{llama_server}"\n'
        f'user = "{account.pw_name}"\n'
        f'socket = "{socket_path()}"\n'
        f'socket_group = "{group}"\n')
    (directory / f"{INSTANCE}.toml").write_text(
        "# A tiny random-weight llama model on the cpu build: it answers with gibberish.\n"
        f'model = "{model}"\n'
        f"port = {PORT}\n"
        "ctx_size = 512\n"
        "n_gpu_layers = 0  # the cpu build, on purpose (preflight refuses a silent CPU fallback)\n"
        "autostart = true\n")
    return directory


def prepare(cache: Path | None = None, output: IO[str] | None = None) -> Path:
    """Fetch, build (or reuse the build), generate, write; return the config directory.
    cmake's output goes to `output` (None: inherited)."""
    cache = cache or llamasrc.cache_root()
    source = llamasrc.ensure_source(cache=cache)
    env = dict(os.environ)
    generator = build.check_programs("cpu", env)
    plan = build.plan_build(source, llamasrc.build_root(cache=cache), "cpu",
                            build.select_tools(source, TOOLS),
                            jobs=len(os.sched_getaffinity(0)), generator=generator)
    build.build(plan, env, output=output)
    model = tinymodel.cached(cache / "models", source / tinymodel.VOCAB_FILE)
    return write_config(cache / "demo", plan.root / "current" / "bin" / "llama-server", model)


def prepare_rpc(cache: Path | None = None, output: IO[str] | None = None) -> Path:
    """The cpu build with llama.cpp's RPC server (RPC_TOOLS), in a build root of its own; its
    bin directory. The tests' RPC part uses it; scripts/test.sh prepares it before pytest."""
    cache = cache or llamasrc.cache_root()
    source = llamasrc.ensure_source(cache=cache)
    env = dict(os.environ)
    plan = build.plan_build(source, llamasrc.build_root(cache=cache, flavour="rpc"), "cpu",
                            build.select_tools(source, RPC_TOOLS),
                            jobs=len(os.sched_getaffinity(0)),
                            generator=build.check_programs("cpu", env))
    build.build(plan, env, output=output)
    return plan.root / "current" / "bin"


def main() -> None:
    """The demo script's edge: errors become one line and exit status 1. `--rpc` prepares the
    RPC build instead and prints its bin directory."""
    try:
        directory = (prepare_rpc if sys.argv[1:] == ["--rpc"] else prepare)(output=sys.stderr)
    except (build.BuildError, llamasrc.SourceError, OSError, ValueError) as exc:
        sys.stderr.write(f"demo: {exc}\n")
        raise SystemExit(1) from None
    sys.stderr.flush()
    sys.stdout.write(f"{directory}\n")


if __name__ == "__main__":
    main()
