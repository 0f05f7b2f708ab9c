"""Helpers for tests that run a real Supervisor in-process: config directories and state records."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from mi50d.config import Config, load_config
from mi50d.engine.supervisor import Supervisor
from mi50d.host.accounts import account_for

FAKE_SERVER = Path(__file__).with_name("fakeserver.py")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def toml_text(data: Mapping[str, Any]) -> str:
    """Just enough TOML writing for test configs: scalars, lists, and one level of tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for key, table in data.items():
        if isinstance(table, Mapping):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def write_config(directory: Path, daemon: Mapping[str, Any],
                 instances: Mapping[str, Mapping[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mi50d.toml").write_text(toml_text({"user": getpass.getuser(), **daemon}))
    for name, inst in instances.items():
        (directory / f"{name}.toml").write_text(toml_text(inst))
    return directory


def fake_daemon(**extra: Any) -> dict[str, Any]:
    """Daemon settings whose default binary is the fake server (run by this interpreter)."""
    return {"llama_server": str(FAKE_SERVER), "preflight": False, **extra}


def fake_env(**env: Any) -> dict[str, str]:
    """An instance `env` table for the fake server; PATH makes its shebang find this python."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            **{k: str(v) for k, v in env.items()}}


class Recorder:
    """Every state change of every instance, in order, read from the supervisor's event hub."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._stack = contextlib.ExitStack()
        self._sub = self._stack.enter_context(supervisor.events.subscribe(size=100_000))
        self.states: dict[str, list[str]] = {}
        self.reasons: dict[str, list[str]] = {}

    def close(self) -> None:
        self._stack.close()

    def sequence(self, name: str) -> list[str]:
        """The states `name` went through, up to now."""
        self._drain()
        return self.states.get(name, [])

    def _drain(self) -> None:
        while not self._sub.queue.empty():
            self._take(self._sub.take_nowait())

    def _take(self, event: dict[str, Any]) -> None:
        if event["event"] == "state":
            st = event["status"]
            seq = self.states.setdefault(st["name"], [])
            if not seq or seq[-1] != st["state"]:
                seq.append(st["state"])
                self.reasons.setdefault(st["name"], []).append(st["reason"])

    async def wait(self, name: str, state: str, count: int = 1, timeout: float = 60) -> list[str]:
        """Wait until `name` entered `state` `count` times in all; return its sequence so far."""
        async with asyncio.timeout(timeout):
            while True:
                self._drain()
                if self.states.get(name, []).count(state) >= count:
                    return self.states[name]
                self._take(await self._sub.get())


@contextlib.asynccontextmanager
async def supervising(directory: Path) -> AsyncIterator[tuple[Supervisor, Recorder]]:
    """A real Supervisor on `directory`, in its own TaskGroup, shut down on exit."""
    async with supervising_config(load_config(directory)) as pair:
        yield pair


@contextlib.asynccontextmanager
async def supervising_config(config: Config) -> AsyncIterator[tuple[Supervisor, Recorder]]:
    """A real Supervisor on `config` (which may have been altered past validation, to inject a
    fault), in its own TaskGroup, shut down on exit."""
    sup = Supervisor(config, account_for(config))
    rec = Recorder(sup)
    try:
        async with asyncio.TaskGroup() as tg:
            sup.launch(tg)
            try:
                yield sup, rec
            finally:
                await sup.shutdown()
    finally:
        rec.close()


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
