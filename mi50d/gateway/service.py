"""The gateway's lifetime in the daemon: open (keys, client session, listener), launch (its
tasks in the daemon's TaskGroup), close (listener, requests, the session), in that order."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from mi50d.config import GatewayConfig
from mi50d.engine.supervisor import Supervisor
from mi50d.gateway.app import Gateway, make_app
from mi50d.gateway.fronts import Fronts, listeners
from mi50d.gateway.instances import Instances
from mi50d.gateway.keys import load_keys
from mi50d.gateway.observer import NullObserver, Observer
from mi50d.gateway.ondemand import OnDemand
from mi50d.gateway.proxy import client_session

log = logging.getLogger("mi50d.gateway")

# How long closing waits for requests still running before cancelling them: the daemon is
# stopping every instance next, which ends their streams anyway.
SHUTDOWN_GRACE_S = 1.0


class ListenError(Exception):
    """The gateway cannot listen where [gateway] listen says; the message says why and what to do."""


class GatewayService:
    def __init__(self, settings: GatewayConfig, supervisor: Supervisor,
                 observer: Observer | None = None,
                 extra_routes: Sequence[web.RouteDef] = ()) -> None:
        address = settings.address()
        assert address is not None, "only built when [gateway] listen is set"
        self.settings = settings
        self.host, self.port = address
        self.observer: Observer = observer or NullObserver()
        self.extra_routes = extra_routes
        self.ondemand = OnDemand(Instances(supervisor), settings, self.observer)
        self._supervisor = supervisor
        self._runner: web.AppRunner | None = None
        self._gateway: Gateway | None = None
        self.fronts: Fronts | None = None
        self._private: Path | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}"

    def in_flight(self, name: str) -> int:
        return self.ondemand.activity(name).in_flight

    def last_used(self, name: str) -> float | None:
        return self.ondemand.activity(name).last_used

    async def open(self) -> None:
        """Read the keys, open the client session and listen; ConfigError for a bad key file,
        ListenError when the address is taken or not ours."""
        keys = load_keys(self.settings.api_key_file) if self.settings.api_key_file else None
        session = client_session()
        self._gateway = Gateway(self.settings, Instances(self._supervisor), self.ondemand,
                                session, self.observer, keys)
        runner = web.AppRunner(make_app(self._gateway, self.extra_routes),
                               handler_cancellation=True, access_log=None,
                               shutdown_timeout=SHUTDOWN_GRACE_S)
        self._runner = runner
        await runner.setup()
        try:
            if self.settings.workers:
                await self._open_fronts(runner, self._gateway)
            else:
                await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
        except OSError as exc:
            await self.close()
            raise ListenError(f"gateway: cannot listen on {self.settings.listen}: "
                              f"{exc.strerror or exc}; free the port (ss -ltnp 'sport = "
                              f":{self.port}') or change [gateway] listen in mi50d.toml") from None
        log.info("gateway_listening url=%s keys=%s workers=%d", self.url,
                 "on" if keys else "off", self.settings.workers)

    async def _open_fronts(self, runner: web.AppRunner, gateway: Gateway) -> None:
        """The address's sockets for the front processes, and the daemon's own gateway on a
        Unix socket in a directory only the daemon's user may enter, for what they pass on."""
        sockets = listeners(self.host, self.port, self.settings.workers)
        self._private = Path(tempfile.mkdtemp(prefix="mi50d-gateway-"))
        internal = str(self._private / "gateway.sock")
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(internal)
        unix.listen(1024)
        await web.SockSite(runner, unix).start()
        self.fronts = Fronts(sockets, internal, self.settings.max_body_bytes,
                             gateway.front_state, self.ondemand, self.observer)
        self.ondemand.on_notify.append(self.fronts.push)
        self.ondemand.fronts_closed = self.fronts.closed

    def launch(self, tg: asyncio.TaskGroup) -> None:
        self.ondemand.launch(tg)
        if self.fronts is not None:
            self.fronts.launch(tg)

    async def close(self) -> None:
        """Stop listening, end the requests still running, close the upstream session."""
        self.ondemand.close()
        if self.fronts is not None:
            await self.fronts.close()
            self.fronts = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._gateway is not None:
            await self._gateway.session.close()
            self._gateway = None
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None
