"""All instances, one task each in the daemon's TaskGroup; the requests on them by name
(start/stop/restart, and `ensure_running`/`ensure_stopped` for the gateway); reload as a diff.

`apply(new_config)` restarts only instances whose effective launch changed (frozen configs compare
with `!=`), starts added ones that autostart, stops removed ones and does not touch the rest: no
reload of a 20 GB model because another file changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mi50d.config import Config, DaemonConfig, InstanceConfig
from mi50d.control.protocol import InstanceStatus
from mi50d.engine.desired import Kind, Reply, Ticket
from mi50d.engine.events import Hub
from mi50d.engine.instance import Instance
from mi50d.engine.run import Hooks
from mi50d.engine.states import ALIVE, State
from mi50d.engine.units import UnitSpawner
from mi50d.host.accounts import Account
from mi50d.host.gpumem import process_vram
from mi50d.host.hooks import degraded_reason, diagnose_failure, preflight_job
from mi50d.host.preflight import Other
from mi50d.host.vram import parse_buffers

log = logging.getLogger("mi50d.engine.supervisor")


class UnknownInstance(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no instance named {self.name!r}"


@dataclass
class ReloadReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


class Supervisor:
    def __init__(self, config: Config, account: Account | None,
                 spawner: UnitSpawner | None = None) -> None:
        self.config = config
        self.spawner = spawner  # None: instances are direct children (engine.process)
        self.account = account  # from accounts.account_for(config)
        self.events = Hub()
        self._instances: dict[str, Instance] = {}
        self._closing: set[Instance] = set()  # removed by a reload, still stopping
        self._tg: asyncio.TaskGroup | None = None
        self.on_change: list[Callable[[], None]] = []
        self.observe: Callable[[str, str, float], None] = lambda name, event, seconds: None

    # ---- lifecycle ---------------------------------------------------------------------------

    def launch(self, tg: asyncio.TaskGroup) -> None:
        """Create every instance's task in `tg` and request the autostart ones."""
        self._tg = tg
        for conf in self.config.instances.values():
            inst = self._add(conf)
            if conf.autostart:
                inst.request(Kind.START)

    async def shutdown(self) -> None:
        """Close every instance at once (each bounded by its own stop timeout)."""
        await asyncio.gather(*(inst.close() for inst in self._instances.values()),
                             *(inst.close() for inst in self._closing))

    def hurry(self) -> None:
        """A second SIGTERM: every stop under way or to come SIGKILLs at once."""
        for inst in (*self._instances.values(), *self._closing):
            inst.hurry()

    def _add(self, config: InstanceConfig, hold: asyncio.Event | None = None) -> Instance:
        assert self._tg is not None, "launch() first"

        def preflight(conf: InstanceConfig, daemon: DaemonConfig,
                      account: Account | None) -> Callable[[], str | None]:
            return preflight_job(conf, daemon, account, self.others(conf.name),
                                 units=self.spawner is not None)

        inst = Instance(
            config,
            self.config.daemon,
            self.account,
            on_change=self._changed,
            on_line=self._line,
            hooks=Hooks(preflight=preflight, diagnose=diagnose_failure,
                        degraded=degraded_reason, buffers=_buffers,
                        observe=lambda name, event, s: self.observe(name, event, s),
                        spawn=None if self.spawner is None else self.spawner.spawn),
            hold=hold,
        )
        self._instances[config.name] = inst
        self._tg.create_task(self._guarded(inst), name=f"instance:{config.name}")
        return inst

    async def _guarded(self, inst: Instance) -> None:
        """The loop turns its own errors into the instance's FAILED state; this is the last
        line, for a bug in the loop itself: log it, leave that instance failed."""
        try:
            await inst.run()
        except Exception:
            log.exception("instance_crashed instance=%s", inst.name)
            inst.state, inst.reason = State.FAILED, "internal error in mi50d; see the journal"
            self._changed(inst)
        finally:
            self._closing.discard(inst)

    # ---- commands ----------------------------------------------------------------------------

    def get(self, name: str) -> Instance:
        try:
            return self._instances[name]
        except KeyError:
            raise UnknownInstance(name) from None

    def names(self) -> list[str]:
        return sorted(self._instances)

    def start(self, name: str) -> Ticket:
        """Ask for `name` to be up; the ticket resolves once it runs or gives up."""
        return self.get(name).request(Kind.START)

    async def ensure_running(self, name: str, timeout_s: float | None = None) -> Reply:
        """Ask for `name` to be up and wait until it is (`reached`, state running), it gave up
        (`failed`: see reply.reason), a later stop came first (`superseded`), a reload removed
        it (`removed`), or `timeout_s` passed (`timeout`; it keeps starting). Returns at once
        when it runs already. Raises only UnknownInstance. For the gateway and `start`."""
        return await self.start(name).wait(timeout_s)

    async def ensure_stopped(self, name: str, timeout_s: float | None = None) -> Reply:
        """Ask for `name` to be down and wait until no process of it is left (`reached`, state
        stopped or failed), a later start came first (`superseded`), or `timeout_s` passed
        (None: its stop timeout plus the SIGKILL's grace). A stop always wins over any start
        asked before it, and cuts preflight, loading and backoff short. Raises only
        UnknownInstance. For the gateway (evict, idle stop) and `stop`."""
        inst = self.get(name)
        ticket = inst.request(Kind.STOP)
        return await ticket.wait(inst.stop_bound_s() if timeout_s is None else timeout_s)

    async def stop(self, name: str, timeout_s: float | None = None) -> Reply:
        return await self.ensure_stopped(name, timeout_s)

    async def restart(self, name: str, timeout_s: float | None = None) -> Reply:
        """Stop `name` if it runs and start it again; the reply comes once the new attempt has
        begun (follow it with `ensure_running`)."""
        inst = self.get(name)
        ticket = inst.request(Kind.RESTART)
        return await ticket.wait(inst.stop_bound_s() if timeout_s is None else timeout_s)

    async def apply(self, new: Config, account: Account | None) -> ReloadReport:
        """Move from the running configuration to `new` (validated, its account resolved).

        Every change is recorded at once, before any wait, so a request that comes during the
        reload is ordered after it: a stop then wins over the reload's restart. Removed and
        changed instances stop together; the changed ones start again (if still wanted up, or
        autostart) only once all of those stops are done, so two servers never meet on a port.
        """
        report = ReloadReport()
        old_account = self.account
        self.config, self.account = new, account
        gone = [self._instances.pop(n) for n in list(self._instances) if n not in new.instances]
        report.removed = sorted(i.name for i in gone)
        settled = asyncio.Event()
        tickets: list[tuple[Instance, Ticket]] = []
        for inst in gone:
            self._closing.add(inst)
            tickets.append((inst, inst.request(Kind.CLOSE)))
        for name, conf in new.instances.items():
            if name not in self._instances:
                report.added.append(name)
                continue
            inst = self._instances[name]
            was, was_daemon, _ = inst.planned()
            if (_launch_key(conf, new.daemon, account)
                    != _launch_key(was, was_daemon, old_account)):
                tickets.append((inst, inst.reconfigure(conf, new.daemon, account, settled)))
                if conf.autostart:
                    inst.request(Kind.START)
                report.restarted.append(name)
            else:
                inst.update(conf, new.daemon)  # equal launch; new source path, daemon settings
                report.unchanged.append(name)
        for name in report.added:
            conf = new.instances[name]
            fresh = self._add(conf, hold=settled)  # a removed one may still hold its port
            if conf.autostart:
                fresh.request(Kind.START)
        try:
            await asyncio.gather(*(t.wait(i.stop_bound_s()) for i, t in tickets))
        finally:
            settled.set()
        log.info("config_reloaded added=%s removed=%s restarted=%s unchanged=%d",
                 report.added, report.removed, report.restarted, len(report.unchanged))
        self._changed(None)
        return report

    def others(self, name: str) -> list[Other]:
        """The other instances, for the port and VRAM checks of `name`: what each alive one
        holds per GPU, from the KFD (else from buffer sizes in its output, at debug verbosity)."""
        return [
            Other(i.name, i.config.host, i.config.port, running=i.state in ALIVE,
                  vram=self._vram_held(i))
            for i in self._instances.values() if i.name != name
        ]

    # ---- views -------------------------------------------------------------------------------

    def status(self, name: str | None = None) -> list[InstanceStatus]:
        chosen: Iterable[Instance] = (
            [self.get(name)] if name is not None else (self._instances[n] for n in self.names())
        )
        return [status_of(i, self._vram_held(i)) for i in chosen]

    def describe(self, inst: Instance) -> InstanceStatus:
        """`inst`'s status, also after a reload removed it."""
        return status_of(inst, self._vram_held(inst))

    def summary(self) -> str:
        """One line for systemd's STATUS=, e.g. `2/3 running; qwen3-vl-32b starting 41s`."""
        insts = list(self._instances.values())
        running = sum(i.state is State.RUNNING for i in insts)
        parts = [f"{running}/{len(insts)} running"]
        now = time.time()
        for i in sorted(insts, key=lambda i: i.name):
            if i.state not in (State.RUNNING, State.STOPPED):
                parts.append(f"{i.name} {i.state} {now - i.since:.0f}s")
        return "; ".join(parts)

    def _changed(self, inst: Instance | None) -> None:
        if inst is not None:
            status = status_of(inst, self._vram_held(inst))
            self.events.publish({"event": "state", "status": status.model_dump()})
        for hook in self.on_change:
            hook()

    def _vram_held(self, inst: Instance) -> dict[int, int]:
        """What an alive instance holds per GPU: the KFD's count for its pid, else the buffer
        sizes it logged while loading (debug verbosity only; read once, when it became ready)."""
        if inst.state not in ALIVE or inst.pid is None:
            return {}
        return process_vram(inst.daemon.host.sysfs_root, inst.pid) or dict(inst.logged_vram)

    def _line(self, inst: Instance, line: str) -> None:
        if self.spawner is None:  # a unit's output is in the journal under the unit already
            log.info("[%s] %s", inst.name, line)
        self.events.publish({"event": "line", "name": inst.name, "line": line})


def _buffers(config: InstanceConfig) -> Callable[[Sequence[str]], dict[int, int]]:
    def read(lines: Sequence[str]) -> dict[int, int]:
        return parse_buffers(lines).per_gpu(config.gpus)

    return read


def _launch_key(conf: InstanceConfig, daemon: DaemonConfig,
                account: Account | None) -> tuple[object, ...]:
    """Everything that decides how an instance is launched; `source` does not, nor do the
    gateway's `on_demand` and `idle_unload_s` (a reload changing them restarts nothing)."""
    same = conf.model_copy(update={"source": None, "on_demand": False, "idle_unload_s": None})
    return (same, conf.argv(daemon), account)


def status_of(inst: Instance, vram: dict[int, int]) -> InstanceStatus:
    conf = inst.config
    return InstanceStatus(
        name=inst.name,
        state=str(inst.state),
        reason=inst.reason,
        pid=inst.pid,
        host=conf.host,
        port=conf.port,
        endpoint=conf.endpoint(),
        autostart=conf.autostart,
        since=inst.since,
        uptime_s=inst.uptime_s(),
        restarts=inst.restarts,
        last_exit=inst.last_exit,
        gpus=conf.gpus,
        vram=vram,
        diagnosis=inst.diagnosis,
        last_lines=inst.last_lines,
    )
