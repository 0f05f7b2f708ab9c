"""The kernel's enforcement of an rpc-worker's `allow` when it runs as a direct child of mi50d
(as a systemd unit, IPAddressAllow=/IPAddressDeny=any on the unit does it instead).

One nftables table per worker, `inet mi50d_<name>`, with an input chain that accepts TCP to the
worker's port from the allowed networks and rejects every other client with a TCP reset (so a
client is refused at once, not left to time out). It is replaced whole, atomically, at every
start (`nft -f` runs a script as one transaction), and it stays while the worker is configured:
it only filters the worker's own port.
"""

from __future__ import annotations

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


def install(instance: str, port: int, networks: Sequence[str]) -> None:
    nft = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
    if nft is None:
        raise FirewallError("nft not found, so nothing would enforce allow; install nftables "
                            "(apt-get install nftables), or run mi50d under systemd")
    try:
        done = subprocess.run([nft, "-f", "-"], input=script(instance, port, networks),
                              capture_output=True, text=True, timeout=NFT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"nft failed: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise FirewallError(f"nft refused the rules for allow (exit {done.returncode}: {last}); "
                            "mi50d must run as root to install them")
