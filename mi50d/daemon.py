"""serve(config): signals, supervisor and reloads in one TaskGroup, and the shutdown sequence.

Signal handlers only set events: SIGTERM/SIGINT -> stop, SIGHUP -> reload. A reload reads and
validates the whole directory first and keeps the running set on any error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from mi50d.config import Config, ConfigError, load_config
from mi50d.supervisor import ReloadReport, Supervisor

log = logging.getLogger("mi50d.daemon")


class Daemon:
    """What the control handlers act on: the supervisor and the reload path."""

    def __init__(self, config: Config, socket_path: Path, supervisor: Supervisor) -> None:
        self.config_dir = config.directory
        self.socket_path = socket_path
        self.supervisor = supervisor
        self.stop_requested = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.on_reload: list[Callable[[bool], None]] = []  # called with True before, False after

    async def reload(self) -> ReloadReport:
        """Re-read the directory; raise ConfigError (running set untouched) or apply the diff."""
        async with self._reload_lock:
            for hook in self.on_reload:
                hook(True)
            try:
                new = await asyncio.to_thread(load_config, self.config_dir)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("reload_rejected %s (running set kept)", problem)
                raise
            finally:
                for hook in self.on_reload:
                    hook(False)
            return await self.supervisor.apply(new)

    async def reload_on_signal(self) -> None:
        while True:
            await self.reload_requested.wait()
            self.reload_requested.clear()
            log.info("reload_requested source=SIGHUP")
            with contextlib.suppress(ConfigError):  # logged in reload(); running set kept
                await self.reload()


def install_signal_handlers(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, daemon.stop_requested.set)
    loop.add_signal_handler(signal.SIGINT, daemon.stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_requested.set)


async def serve(config: Config, socket_path: Path) -> None:
    supervisor = Supervisor(config)
    daemon = Daemon(config, socket_path, supervisor)
    install_signal_handlers(daemon)
    async with asyncio.TaskGroup() as tg:
        supervisor.launch(tg)
        reloader = tg.create_task(daemon.reload_on_signal(), name="reload")
        log.info("daemon_ready instances=%d socket=%s", len(config.instances), socket_path)
        await daemon.stop_requested.wait()
        # Shutdown, in order:
        # 1. stop taking reloads, so the set of instances is final;
        log.info("daemon_stopping")
        reloader.cancel()
        # 2. stop every instance (SIGTERM, their stop timeout, SIGKILL), all at once;
        await supervisor.shutdown()
        # 3. leaving the TaskGroup waits for the instance tasks, which have returned.
    log.info("daemon_stopped")
