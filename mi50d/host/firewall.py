"""The kernel's enforcement of an rpc-worker's `allow`, whether it runs as a direct child of
mi50d (mi50d runs nft before each start) or as a systemd unit (the unit runs the same nft
script as a privileged ExecStartPre=, and removes the table in ExecStopPost=; mi50d.service
itself has no CAP_NET_ADMIN). A unit also gets IPAddressAllow=/IPAddressDeny=any, a second layer
that only works where systemd can attach cgroup BPF programs: inside a container it often
cannot, and says so only in its journal, so nftables is what `allow` relies on.

One nftables table per worker, `inet mi50d_<name>`, with an input chain that accepts TCP to the
worker's port from the allowed networks and rejects every other client with a TCP reset (so a
client is refused at once, not left to time out). It is replaced whole, atomically, at every
start (`nft -f` runs a script as one transaction), and removed once the worker's process is
gone (by mi50d for a direct child, by the unit's ExecStopPost= for a unit); it only filters
the worker's own port.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Sequence

NFT_TIMEOUT_S = 10.0


class FirewallError(Exception):
    """The rules could not be installed: the line says why and what to do."""


def table_name(instance: str) -> str:
    return "mi50d_" + re.sub(r"[^A-Za-z0-9_]", "_", instance)


def script(instance: str, port: int, networks: Sequence[str]) -> str:
    """The nft script for `instance`'s worker on `port`, letting only `networks` in; pure."""
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    table = table_name(instance)
    lines = [f"table inet {table} {{}}", f"delete table inet {table}",
             f"table inet {table} {{",
             "  chain input {",
             "    type filter hook input priority filter - 10; policy accept;"]
    for family, version in (("ip", 4), ("ip6", 6)):
        wanted = [str(n) for n in nets if n.version == version]
        if wanted:
            lines.append(f"    tcp dport {port} {family} saddr {{ {', '.join(wanted)} }} accept")
    lines += [f"    tcp dport {port} reject with tcp reset", "  }", "}", ""]
    return "\n".join(lines)


def nft_path() -> str | None:
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")


def _nft() -> str:
    nft = nft_path()
    if nft is None:
        raise FirewallError("nft not found, so nothing would enforce allow; install nftables "
                            "(apt-get install nftables)")
    return nft


def _delete(nft: str, instance: str) -> tuple[str, ...]:
    return (nft, "delete", "table", "inet", table_name(instance))


def unit_commands(instance: str, port: int,
                  networks: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(ExecStartPre argv, ExecStopPost argv) that install and remove the table around a
    unit's run; FirewallError without nft. The script goes as one argument (nft reads its
    arguments as one command buffer, newlines included)."""
    nft = _nft()
    return (nft, script(instance, port, networks)), _delete(nft, instance)


def install(instance: str, port: int, networks: Sequence[str]) -> None:
    nft = _nft()
    try:
        done = subprocess.run([nft, "-f", "-"], input=script(instance, port, networks),
                              capture_output=True, text=True, timeout=NFT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"nft failed: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise FirewallError(f"nft refused the rules for allow (exit {done.returncode}: {last}); "
                            "mi50d must run as root to install them")


def remove(instance: str) -> None:
    """Delete the table once the worker is gone; best effort (a table already gone, or no nft,
    leaves nothing to do: a port nobody listens on needs no filter)."""
    nft = nft_path()
    if nft is None:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(_delete(nft, instance), capture_output=True, timeout=NFT_TIMEOUT_S,
                       check=False)
