"""serve(config): signals, supervisor, control socket, systemd notifications and reloads in one
TaskGroup, and the shutdown sequence.

Signal handlers only set events: SIGTERM/SIGINT -> stop (a second one -> stop fast: SIGKILL
now), SIGHUP -> reload. A reload (SIGHUP or
`mi50ctl reload`, the same path) reads and validates the whole directory first and keeps the
running set on any error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from mi50d.config import Config, ConfigError, load_config
from mi50d.control.server import ControlServer, ControlSocketError, bind_socket, socket_path_of
from mi50d.engine.adopt import Found, adopt, stop_orphans, survey
from mi50d.engine.states import State
from mi50d.engine.supervisor import ReloadReport, Supervisor, UnknownInstance
from mi50d.engine.units import UnitSpawner, units_wanted
from mi50d.gateway.service import GatewayService
from mi50d.host.accounts import Account, account_for
from mi50d.host.flashattn import with_host_defaults
from mi50d.metrics.exporter import Exporter
from mi50d.metrics.routes import metrics_routes
from mi50d.systemd import Notifier, announce, listen_socket, ping_watchdog

log = logging.getLogger("mi50d.daemon")


class Daemon:
    """What the control handlers act on: the supervisor and the reload path."""

    def __init__(self, config: Config, socket_path: Path, supervisor: Supervisor) -> None:
        self.config_dir = config.directory
        self.socket_path = socket_path
        self.supervisor = supervisor
        self.started = time.monotonic()
        self.stop_requested = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.on_reload: list[Callable[[bool], None]] = []  # called with True before, False after
        self.gateway: GatewayService | None = None  # when [gateway] listen is set

    async def reload(self) -> ReloadReport:
        """Re-read the directory; raise ConfigError (running set untouched) or apply the diff."""
        async with self._reload_lock:
            for hook in self.on_reload:
                hook(True)
            try:
                try:
                    new = await asyncio.to_thread(
                        lambda: with_host_defaults(load_config(self.config_dir)))
                    account = account_for(new)
                except ConfigError as exc:
                    for problem in exc.problems:
                        log.error("reload_rejected %s (running set kept)", problem)
                    raise
                return await self.supervisor.apply(new, account)
            finally:
                for hook in self.on_reload:
                    hook(False)

    async def reload_on_signal(self) -> None:
        while True:
            await self.reload_requested.wait()
            self.reload_requested.clear()
            log.info("reload_requested source=SIGHUP")
            with contextlib.suppress(ConfigError):  # logged in reload(); running set kept
                await self.reload()

    @contextlib.asynccontextmanager
    async def no_more_reloads(self) -> AsyncIterator[None]:
        """Wait for a reload in progress to finish, then hold off any other."""
        async with self._reload_lock:
            yield


    def stop_signal(self) -> None:
        """SIGTERM/SIGINT: the first asks for an orderly shutdown; a second one for a fast one
        (every stop under way or to come SIGKILLs its instance now)."""
        if self.stop_requested.is_set():
            log.warning("daemon_stopping_fast reason=second_signal")
            self.supervisor.hurry()
        self.stop_requested.set()


def install_signal_handlers(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, daemon.stop_signal)
    loop.add_signal_handler(signal.SIGINT, daemon.stop_signal)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_requested.set)


def autostart_settled(supervisor: Supervisor) -> bool:
    """Every autostart instance is running, or has given up (for `wait_ready`)."""
    for name, conf in supervisor.config.instances.items():
        if not conf.autostart:
            continue
        try:
            inst = supervisor.get(name)
        except UnknownInstance:
            continue
        if inst.state in (State.RUNNING, State.UNHEALTHY, State.FAILED):
            continue
        if inst.state is State.STOPPED and not inst.wanted:
            continue
        return False
    return True


def open_control(daemon: Daemon, config: Config, socket_path: Path) -> ControlServer:
    """systemd's socket when it passed one (never unlinked by us), else our own at socket_path."""
    try:
        inherited = listen_socket()
    except ValueError as exc:
        raise ControlSocketError(str(exc)) from None
    if inherited is not None:
        path = socket_path_of(inherited) or socket_path
        log.info("control_socket_inherited path=%s", path)
        daemon.socket_path = path
        return ControlServer(daemon, inherited, path, activated=True)
    sock = bind_socket(socket_path, config.daemon.socket_group)
    return ControlServer(daemon, sock, socket_path, activated=False)


async def instance_units(under_systemd: bool) -> tuple[UnitSpawner | None, list[Found]]:
    """The unit spawner and the units it finds, when instances run as systemd units; else (or
    when systemd cannot be reached over D-Bus: logged) None, and instances are direct children."""
    if not units_wanted(under_systemd):
        return None, []
    spawner = UnitSpawner()
    try:
        spawner.manager()  # connects and imports GLib in this thread, once
        found = await asyncio.to_thread(survey, spawner)
    except Exception as exc:
        log.warning("instance_units_unavailable (%s): instances run as direct children", exc)
        return None, []
    log.info("instance_units units=%d", len(found))
    return spawner, found


async def serve(config: Config, account: Account | None, socket_path: Path) -> None:
    notifier = Notifier()  # reads NOTIFY_SOCKET/WATCHDOG_* and removes them from os.environ
    spawner, found = await instance_units(notifier.enabled)
    supervisor = Supervisor(config, account, spawner)
    daemon = Daemon(config, socket_path, supervisor)
    control = open_control(daemon, config, socket_path)  # listening before READY=1
    resources = contextlib.AsyncExitStack()  # the metrics exporter's client session
    if config.daemon.gateway.listen:
        exporter = Exporter(supervisor)  # GET /metrics on the gateway's listener
        daemon.gateway = GatewayService(config.daemon.gateway, supervisor, exporter.gateway,
                                        metrics_routes(exporter))
    changed = asyncio.Event()
    supervisor.on_change.append(changed.set)
    daemon.on_reload.append(
        lambda before: notifier.reloading() if before else notifier.reloaded(supervisor.summary()))
    install_signal_handlers(daemon)
    settled = (lambda: autostart_settled(supervisor)) if config.daemon.wait_ready else None
    try:
        if daemon.gateway is not None:
            await resources.enter_async_context(exporter)
            await daemon.gateway.open()  # listening before READY=1, like the control socket
        async with asyncio.TaskGroup() as tg:
            supervisor.launch(tg)
            orphans = adopt(supervisor, found)  # before any await: no instance loop ran yet
            if orphans and spawner is not None:
                tg.create_task(stop_orphans(spawner, orphans), name="orphans")
            if daemon.gateway is not None:
                daemon.gateway.launch(tg)
            serving = tg.create_task(control.serve(), name="control")
            watchdog = tg.create_task(ping_watchdog(notifier), name="watchdog")
            announcer = tg.create_task(announce(notifier, supervisor.summary, changed, settled),
                                       name="announce")
            reloader = tg.create_task(daemon.reload_on_signal(), name="reload")
            log.info("daemon_started instances=%d socket=%s", len(config.instances),
                     daemon.socket_path)
            await daemon.stop_requested.wait()
            # Shutdown, in order:
            # 1. tell systemd, stop taking reloads and let one in progress finish, so the set
            #    of instances is final;
            log.info("daemon_stopping")
            notifier.stopping(f"stopping; {supervisor.summary()}")
            announcer.cancel()
            reloader.cancel()
            async with daemon.no_more_reloads():
                # 2. stop listening and end every control connection (streams end with it);
                serving.cancel()
                control.close()
                #    then the gateway: stop listening, end its requests, close its session;
                if daemon.gateway is not None:
                    await daemon.gateway.close()
                # 3. stop every instance (SIGTERM, their stop timeout, SIGKILL), all at once;
                #    the watchdog keeps pinging meanwhile: a slow stop is not a hang. Instances
                #    run as systemd units are left running instead (README, "Instances as
                #    systemd units"): the next mi50d adopts them;
                if spawner is not None:
                    spawner.detach()
                await supervisor.shutdown()
            # 4. end the watchdog; leaving the TaskGroup waits for the instance tasks, which
            #    have returned.
            watchdog.cancel()
    finally:
        control.close()  # also when startup failed inside the TaskGroup
        if daemon.gateway is not None:
            await daemon.gateway.close()
        await resources.aclose()
    log.info("daemon_stopped")
