"""Preflight for llama.cpp's RPC: an rpc-worker's own checks, and a llama-server instance's check
that every worker in its `rpc` list answers and speaks a protocol version its build accepts.

The local build's version is asked of the RPC server binary beside llama-server (build-llama
builds both from one source under one fingerprint): it is started on a free loopback port, says
hello, and is killed (`rpchello.binary_version`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from mi50d.config import DaemonConfig, InstanceConfig, rpc_server_beside
from mi50d.configtypes import is_loopback, rpc_host_port
from mi50d.host.checks import Check, fail, ok, warn
from mi50d.host.firewall import nft_path, table_name
from mi50d.host.rpchello import HelloError, Version, binary_version, compatible, hello

VERSION_TIMEOUT_S = 10.0
HELLO_TIMEOUT_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def local_version(binary: os.PathLike[str] | str, env: Mapping[str, str]) -> Version:
    return binary_version([os.fspath(binary)], env, free_port(), VERSION_TIMEOUT_S)


def worker_version_check(inst: InstanceConfig, daemon: DaemonConfig) -> Check:
    """An rpc-worker's binary starts and answers a hello (it has no --version)."""
    binary = inst.binary(daemon)
    try:
        version = local_version(binary, inst.environment(os.environ, daemon))
    except (HelloError, OSError) as exc:
        return fail("binary", f"{binary} did not start as an RPC server: {exc}",
                    f"run {binary} --port 50052 by hand to see why; rebuild with "
                    "mi50ctl build-llama (it builds the RPC server too)")
    return ok("binary", f"{binary} speaks RPC protocol {version}", version=str(version))


def enforcement_check(inst: InstanceConfig, units: bool) -> Check:
    """How the kernel enforces `allow`: an nftables table `inet mi50d_NAME` (`host.firewall`),
    which mi50d installs before each start of a direct child and a worker's unit installs in a
    privileged ExecStartPre=; a unit also gets IPAddressAllow=/IPAddressDeny=any."""
    if is_loopback(inst.host):
        return ok("allow", f"listens on {inst.host} only")
    allowed = ", ".join(inst.allow)
    if nft_path() is None:
        return fail("allow", f"{inst.host} is not loopback and nft is missing, so nothing would "
                    "enforce allow", "install nftables, or set host = \"127.0.0.1\"")
    if units:
        return ok("allow", f"clients limited to {allowed} and loopback by nftables table inet "
                  f"{table_name(inst.name)}, installed by its unit (and IPAddressAllow=, where "
                  "systemd can attach cgroup BPF)")
    if os.geteuid() != 0:
        return fail("allow", f"{inst.host} is not loopback and mi50d is not root, so it cannot "
                    "install the nftables rules that enforce allow", "run mi50d as root (as "
                    "its service does), or set host = \"127.0.0.1\"")
    return ok("allow", f"clients limited to {allowed} and loopback by nftables table inet "
              f"{table_name(inst.name)} (others get a TCP reset)")


def workers_check(inst: InstanceConfig, daemon: DaemonConfig) -> Check:
    """Every worker in `rpc` answers a hello with a version this build accepts."""
    sibling = rpc_server_beside(inst.binary(daemon))
    if not sibling.exists():
        mine = None
    else:
        try:
            mine = local_version(sibling, inst.environment(os.environ, daemon))
        except (HelloError, OSError):
            mine = None
    versions: dict[str, str] = {}
    for endpoint in inst.rpc:
        try:
            theirs = hello(*rpc_host_port(endpoint), HELLO_TIMEOUT_S)
        except HelloError as exc:
            return fail("rpc", f"RPC worker {endpoint} unreachable: {exc}",
                        "start it (mi50ctl start on that host) and check that its allow "
                        "lists this host", transient=True)
        versions[endpoint] = str(theirs)
        if mine is not None and not compatible(mine, theirs):
            return fail("rpc", f"RPC worker {endpoint} speaks protocol {theirs}, this build "
                        f"speaks {mine}", "build both hosts from the same llama.cpp source "
                        "(mi50ctl build-llama shows its fingerprint)", workers=versions)
    answered = ", ".join(f"{e} ({v})" for e, v in versions.items())
    if mine is None:
        return warn("rpc", f"workers answer: {answered}; this build's RPC version is unknown "
                    f"(no RPC server beside {inst.binary(daemon)})",
                    "build with mi50ctl build-llama, which builds both", workers=versions)
    return ok("rpc", f"workers answer: {answered}; this build speaks {mine}", workers=versions)
