"""Admission of requests to instances: on-demand starts, VRAM swaps and idle unloads.

`admit(name)` lets a request through once its instance is up. For a stopped on-demand instance
it starts one job (`_start_job`, single flight: every request for it waits on that job, bounded
by the instance's `health.start_timeout_s`; a client that leaves just leaves the queue). The job
plans room with `plan.plan` on a fresh snapshot, evicts what the plan names, starts the instance
and waits for it to be up. Jobs that touch the same GPU run one at a time (a lock per GPU);
jobs on different GPUs run in parallel.

Eviction never cuts a request: the victim stops taking new ones (`draining`; they queue), its
in-flight ones finish (up to `swap_wait_s`), it is stopped, and the job waits until its VRAM is
released: its KFD `proc/<pid>` entry is gone and the GPU's used VRAM came down. sysfs gives no
change notification for those files (inotify does not fire on sysfs attributes), so that one
wait re-reads them with gaps growing from 2 ms to 100 ms, bounded by `swap_wait_s`.

Idle unload (`idle_unload_s`) happens in `_reaper`, which sleeps until the next deadline or any
change, and never stops an instance with a request in flight or waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from mi50d.config import GatewayConfig, InstanceConfig
from mi50d.engine.supervisor import UnknownInstance
from mi50d.gateway.errors import GatewayError
from mi50d.gateway.instances import Instances
from mi50d.gateway.observer import Observer
from mi50d.gateway.plan import GpuMemory, Holder, plan
from mi50d.host.ggufmeta import GGUFError, read_gguf
from mi50d.host.gpumem import PROC
from mi50d.host.gpus import list_gpus
from mi50d.host.preflight import expects_gpu
from mi50d.host.vram import estimate

log = logging.getLogger("mi50d.gateway.ondemand")

RELEASE_FIRST_GAP_S = 0.002
RELEASE_MAX_GAP_S = 0.1


@dataclass
class Activity:
    """The gateway's view of one instance's traffic."""

    in_flight: int = 0
    waiting: int = 0  # requests queued for a start or a swap
    last_used: float | None = None  # wall clock: end of the last request (for status)
    idle_since: float | None = None  # monotonic: end of the last request, or when it came up
    draining: bool = False  # the gateway is stopping it: new requests queue meanwhile


class OnDemand:
    def __init__(self, instances: Instances, settings: GatewayConfig, observer: Observer) -> None:
        self._inst = instances
        self._settings = settings
        self._observer = observer
        self._activity: dict[str, Activity] = {}
        self._jobs: dict[str, asyncio.Task[GatewayError | None]] = {}
        self._gpu_locks: dict[int, asyncio.Lock] = {}
        self._changed = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._reaper_task: asyncio.Task[None] | None = None
        # With front processes (`[gateway] workers`): told of every change, and awaited after a
        # victim is marked draining so that the fronts' counts in flight are complete.
        self.on_notify: list[Callable[[], None]] = []
        self.fronts_closed: Callable[[], Awaitable[None]] | None = None
        instances.on_change(self._notify)

    # ---- lifetime ----------------------------------------------------------------------------

    def launch(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        self._reaper_task = tg.create_task(self._reaper(), name="gateway:idle")

    def close(self) -> None:
        for task in [self._reaper_task, *self._jobs.values()]:
            if task is not None:
                task.cancel()

    # ---- views -------------------------------------------------------------------------------

    def activity(self, name: str) -> Activity:
        return self._activity.setdefault(name, Activity())

    def remote(self, before: Mapping[str, int], after: Mapping[str, int]) -> None:
        """A front's requests in flight per instance went from `before` to `after` (they are
        added to the daemon's own); a count that went down is a request that ended."""
        ended = False
        for name in before.keys() | after.keys():
            step = after.get(name, 0) - before.get(name, 0)
            if not step:
                continue
            act = self.activity(name)
            act.in_flight += step
            if step < 0:
                act.last_used, act.idle_since = time.time(), time.monotonic()
                ended = ended or act.in_flight == 0
            if name in self._inst.config.instances:
                self._observer.in_flight_changed(self._inst.config.instances[name].model_name,
                                                 act.in_flight)
        if ended:
            self._notify()

    async def _fronts_closed(self) -> None:
        if self.fronts_closed is not None:
            await self.fronts_closed()

    # ---- admission ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(self, conf: InstanceConfig) -> AsyncIterator[None]:
        """Hold one in-flight slot of `conf`'s instance, once it is up; GatewayError if it
        cannot be (queue full 429, not on demand 503, start failed 502, no room 503)."""
        name = conf.name
        act = self.activity(name)
        if act.draining or not self._inst.is_up(name):
            await self._wait_up(conf, act)
        act.in_flight += 1
        self._observer.in_flight_changed(conf.model_name, act.in_flight)
        try:
            yield
        finally:
            act.in_flight -= 1
            act.last_used, act.idle_since = time.time(), time.monotonic()
            self._observer.in_flight_changed(conf.model_name, act.in_flight)
            if act.in_flight == 0:  # what the reaper and a waiting eviction look for
                self._notify()

    async def _wait_up(self, conf: InstanceConfig, act: Activity) -> None:
        name, model = conf.name, conf.model_name
        if act.waiting >= self._settings.max_queue:
            raise GatewayError(429, f"{act.waiting} requests for {model} are already waiting for "
                               "it to start; retry later, or raise [gateway] max_queue in "
                               "mi50d.toml", "queue_full")
        act.waiting += 1
        self._observer.queue_changed(model, act.waiting)
        try:
            async with asyncio.timeout(conf.health.start_timeout_s):
                while act.draining or not self._inst.is_up(name):
                    await self._step_towards_up(conf, act)
        except TimeoutError:
            raise GatewayError(503, f"{model} did not become ready within start_timeout_s="
                               f"{conf.health.start_timeout_s:g} ({self._inst.why_down(name)})",
                               "start_timeout") from None
        finally:
            act.waiting -= 1
            self._observer.queue_changed(model, act.waiting)

    async def _step_towards_up(self, conf: InstanceConfig, act: Activity) -> None:
        name = conf.name
        if act.draining:
            await self._wait(lambda: not act.draining)
        elif name in self._jobs:
            await self._join(name)
        elif self._inst.coming_up(name):  # starting, or backing off before a restart
            await self._inst.ensure_running(name, conf.health.start_timeout_s)
            if not self._inst.is_up(name) and not conf.on_demand:
                raise GatewayError(502, f"{conf.model_name} failed to start: "
                                   f"{self._inst.why_down(name)}; mi50ctl logs {name} shows its "
                                   "output", "start_failed")
        elif not conf.on_demand:
            raise GatewayError(503, f"{conf.model_name} is not running "
                               f"({self._inst.why_down(name)}) and is not on demand: start it "
                               f"with `mi50ctl start {name}`, or set on_demand = true in "
                               f"{conf.source.name}", "model_not_running")
        else:
            assert self._tg is not None, "launch() first"
            self._jobs[name] = self._tg.create_task(self._start_job(conf), name=f"start:{name}")
            await self._join(name)

    async def _join(self, name: str) -> None:
        # shield: a client that gives up must not cancel the start the others wait on.
        error = await asyncio.shield(self._jobs[name])
        if error is not None:
            raise error

    # ---- the start job -----------------------------------------------------------------------

    async def _start_job(self, conf: InstanceConfig) -> GatewayError | None:
        name, began = conf.name, time.monotonic()
        try:
            async with contextlib.AsyncExitStack() as stack:
                for index in await asyncio.to_thread(self._gpus_of, conf):
                    await stack.enter_async_context(self._gpu_locks.setdefault(index, asyncio.Lock()))
                swapped = await self._make_room(conf)
                if not self._inst.is_up(name):
                    log.info("gateway_starting instance=%s", name)
                    await self._inst.ensure_running(name, conf.health.start_timeout_s)
                if not self._inst.is_up(name):
                    return GatewayError(502, f"{conf.model_name} failed to start: "
                                        f"{self._inst.why_down(name)}; mi50ctl logs {name} "
                                        "shows its output", "start_failed")
                self.activity(name).idle_since = time.monotonic()
                if swapped:
                    self._observer.swap_finished(conf.model_name, time.monotonic() - began)
                return None
        except GatewayError as exc:
            return exc
        except TimeoutError:
            return GatewayError(503, f"{conf.model_name} did not become ready within "
                                f"start_timeout_s={conf.health.start_timeout_s:g}",
                                "start_timeout")
        except UnknownInstance:
            return GatewayError(503, f"instance {name} was removed by a reload", "model_removed")
        except Exception:
            log.exception("gateway_start_crashed instance=%s", name)
            return GatewayError(500, "internal error in mi50d's gateway; see the journal",
                                "internal")
        finally:
            del self._jobs[name]
            self._notify()

    def _gpus_of(self, conf: InstanceConfig) -> list[int]:
        if not expects_gpu(conf):
            return []
        if conf.gpus is not None:
            return sorted(set(conf.gpus))
        return [g.index for g in list_gpus(self._inst.config.daemon.host)]

    async def _make_room(self, conf: InstanceConfig) -> bool:
        """Evict until `conf` fits; True if anything was evicted. GatewayError 503 when even
        evicting everything the gateway may stop would not make room."""
        swapped = False
        for _ in range(len(self._inst.config.instances) + 1):
            snapshot = await asyncio.to_thread(self._snapshot, conf)
            if snapshot is None:
                return swapped  # no estimate: preflight's own checks decide
            need, gpus = snapshot
            decision = plan(need, gpus, self._holders(conf.name))
            if not decision.fits:
                raise GatewayError(503, f"{conf.model_name} does not fit: {decision.reason}; "
                                   "stop an instance (mi50ctl stop NAME) or lower its ctx_size",
                                   "insufficient_vram")
            if not decision.victims:
                return swapped
            log.info("swap_planned instance=%s victims=%s", conf.name, ",".join(decision.victims))
            await asyncio.gather(*(self._evict(v, conf) for v in decision.victims))
            swapped = True
        return swapped

    def _snapshot(self, conf: InstanceConfig) -> tuple[dict[int, int], dict[int, GpuMemory]] | None:
        """(bytes needed per GPU, each GPU's memory) now; None when there is nothing to plan."""
        if conf.force_vram or not expects_gpu(conf):
            return None
        found = list_gpus(self._inst.config.daemon.host)
        wanted = list(conf.gpus) if conf.gpus is not None else [g.index for g in found]
        if not found or any(i >= len(found) for i in wanted):
            return None
        selected = [found[i] for i in wanted]
        if conf.model is None:
            return None
        try:
            model = read_gguf(conf.model)
            mmproj = conf.mmproj.stat().st_size if conf.mmproj is not None else 0
        except (OSError, GGUFError):
            return None
        totals = {g.index: g.vram_total for g in selected}
        if any(t is None for t in totals.values()):
            return None
        est = estimate(conf, model, mmproj, n_gpus=len(selected))
        need = est.split({i: t for i, t in totals.items() if t is not None})
        return need, {g.index: GpuMemory(g.vram_total, g.vram_used) for g in found}

    def _holders(self, target: str) -> list[Holder]:
        instances = self._inst.config.instances
        out = []
        for name, held in self._inst.holdings().items():
            act = self.activity(name)
            conf = instances.get(name)
            evictable = conf is not None and conf.on_demand and name != target
            out.append(Holder(name, held, evictable, act.in_flight,
                              act.idle_since or 0.0))
        return out

    async def _evict(self, victim: str, conf: InstanceConfig) -> None:
        act = self.activity(victim)
        act.draining = True
        self._notify()
        try:
            wait_s = self._settings.swap_wait_s
            try:
                async with asyncio.timeout(wait_s):
                    await self._fronts_closed()
                    await self._wait(lambda: act.in_flight == 0)
            except TimeoutError:
                raise GatewayError(503, f"{conf.model_name} needs the VRAM of {victim}, whose "
                                   f"{act.in_flight} requests did not finish within swap_wait_s="
                                   f"{wait_s:g}; retry later", "swap_timeout") from None
            pid = self._inst.pid(victim)
            held = self._inst.holdings().get(victim, {})
            before = self._used(held)
            log.info("swap_stopping instance=%s for=%s pid=%s", victim, conf.name, pid)
            await self._inst.ensure_stopped(victim)
            if pid is not None:
                await self._released(victim, pid, before, wait_s)
            log.info("swap_released instance=%s for=%s", victim, conf.name)
        finally:
            act.draining = False
            self._notify()

    def _used(self, gpus: Iterable[int]) -> dict[int, int | None]:
        found = {g.index: g.vram_used for g in list_gpus(self._inst.config.daemon.host)}
        return {i: found.get(i) for i in gpus}

    async def _released(self, victim: str, pid: int, before: Mapping[int, int | None],
                        wait_s: float) -> None:
        entry = self._inst.config.daemon.host.sysfs_root / PROC / str(pid)
        gap = RELEASE_FIRST_GAP_S

        def released() -> bool:
            if entry.exists():
                return False
            now = self._used(before)
            return all(b is None or now[i] is None or (now[i] or 0) < b
                       for i, b in before.items())

        try:
            async with asyncio.timeout(wait_s):
                while not await asyncio.to_thread(released):
                    await asyncio.sleep(gap)
                    gap = min(gap * 2, RELEASE_MAX_GAP_S)
        except TimeoutError:
            raise GatewayError(503, f"{victim} (pid {pid}) stopped but its VRAM was not released "
                               f"within swap_wait_s={wait_s:g} ({entry} still exists or the "
                               "GPU's used VRAM did not come down); check rocm-smi --showpids",
                               "vram_not_released") from None

    # ---- idle unload -------------------------------------------------------------------------

    async def _reaper(self) -> None:
        while True:
            now = time.monotonic()
            next_due: float | None = None
            for name, conf in list(self._inst.config.instances.items()):
                due = self._idle_due(name, conf, now)
                if due is None:
                    continue
                if due <= now:
                    await self._unload(name, conf)
                    continue
                next_due = due if next_due is None else min(next_due, due)
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if next_due is None else next_due - now):
                    await changed.wait()

    def _idle_due(self, name: str, conf: InstanceConfig, now: float) -> float | None:
        if not conf.on_demand or conf.idle_unload_s is None:
            return None
        act = self.activity(name)
        try:
            up = self._inst.is_up(name)
        except UnknownInstance:
            return None
        if not up:
            act.idle_since = None
            return None
        if act.in_flight or act.waiting or act.draining or name in self._jobs:
            return None
        if act.idle_since is None:
            act.idle_since = now  # up without a request through us yet (e.g. mi50ctl start)
        return act.idle_since + conf.idle_unload_s

    async def _unload(self, name: str, conf: InstanceConfig) -> None:
        act = self.activity(name)
        act.draining = True
        try:
            try:
                async with asyncio.timeout(self._settings.swap_wait_s):
                    await self._fronts_closed()
            except TimeoutError:  # a front that does not answer: unload later, not blind
                log.warning("idle_unload_postponed instance=%s: a gateway front did not "
                            "acknowledge within swap_wait_s=%g", name, self._settings.swap_wait_s)
                return
            if act.in_flight:  # a front began one just before it saw the unload: not idle
                return
            log.info("idle_unload instance=%s idle_unload_s=%g", name, conf.idle_unload_s or 0)
            await self._inst.ensure_stopped(name)
        except UnknownInstance:
            pass
        finally:
            act.draining = False
            act.idle_since = None
            self._notify()

    # ---- change notification -----------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for hook in self.on_notify:
            hook()

    async def _wait(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()
