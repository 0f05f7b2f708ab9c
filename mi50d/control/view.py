"""What the control plane needs of the daemon, as a structural type.

The daemon (`mi50d.daemon.Daemon`) satisfies it; the handlers and the socket server depend on this
and not on the daemon module, so imports point one way (daemon -> control -> engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mi50d.engine.supervisor import ReloadReport, Supervisor


class GatewayView(Protocol):
    """What status shows of the gateway: its URL and each instance's traffic."""

    @property
    def url(self) -> str: ...

    def in_flight(self, name: str) -> int: ...

    def last_used(self, name: str) -> float | None: ...


class DaemonView(Protocol):
    """The supervisor, where the configuration and socket are, when it started, and the reload path."""

    @property
    def config_dir(self) -> Path: ...

    @property
    def socket_path(self) -> Path: ...

    @property
    def started(self) -> float: ...

    @property
    def supervisor(self) -> Supervisor: ...

    @property
    def gateway(self) -> GatewayView | None: ...

    async def reload(self) -> ReloadReport:
        """Re-read the configuration directory; raise ConfigError or apply the difference."""
        ...
