"""TCP sockets as the kernel lists them in /proc/net/tcp and tcp6: what the health of an RPC
worker and of its client can be read from without connecting to the worker.

llama.cpp's RPC server serves one client at a time from a listen backlog of one, so while
llama-server is its client every extra connection (a probe's) waits in or overflows that backlog.
Instead: the worker is healthy while it still listens on its port; its client has lost it when
the client's connection to the worker is in CLOSE_WAIT (the worker's side closed: it died or was
restarted) — the kernel knows this at once, llama-server only at its next request.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from mi50d.configtypes import rpc_host_port

LISTEN = 0x0A
CLOSE_WAIT = 0x08
TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


@dataclass(frozen=True)
class Sock:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    inode: int


def _address(text: str) -> tuple[str, int]:
    """"0100007F:1F90" -> ("127.0.0.1", 8080); the address is in 32-bit words of host order."""
    addr, _, port = text.partition(":")
    raw = bytes.fromhex(addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def parse(text: str) -> Iterator[Sock]:
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            yield Sock(_address(fields[1]), _address(fields[2]), int(fields[3], 16),
                       int(fields[9]))
        except ValueError:
            continue


def sockets(tables: Iterable[str] = TABLES) -> list[Sock]:
    found: list[Sock] = []
    for table in tables:
        try:
            found += parse(Path(table).read_text())
        except OSError:
            continue
    return found


def listening(port: int, tables: Iterable[str] = TABLES) -> bool:
    """Whether anything on this host listens on TCP `port`."""
    return any(s.state == LISTEN and s.local[1] == port for s in sockets(tables))


def socket_inodes(pid: int) -> set[int]:
    """The socket inodes among `pid`'s open files (readable by root or the process's owner)."""
    found: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def resolve(endpoint: str) -> set[tuple[str, int]]:
    """HOST:PORT -> the addresses it may be connected at (a host name can have several)."""
    host, port = rpc_host_port(endpoint)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {(str(ipaddress.ip_address(i[4][0])), port) for i in infos}


def lost_workers(pid: int, endpoints: Mapping[str, set[tuple[str, int]]],
                 tables: Iterable[str] = TABLES) -> list[str]:
    """The endpoints to which `pid` holds a connection that the other side has closed."""
    mine = socket_inodes(pid)
    closed = {s.remote for s in sockets(tables) if s.inode in mine and s.state == CLOSE_WAIT}
    return [name for name, addresses in endpoints.items() if addresses & closed]
