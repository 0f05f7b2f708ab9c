"""Many random interleavings of start, stop, restart and reload from parallel clients, against the
fake server and (fewer) the real llama-server. Checked: every reply arrives within its bound, no
two servers ever listen on one port (the event stream's pids, and the servers' own bind errors),
nothing fails, each instance's goal is the last request's, it converges there, and no process of
any run is left at the end.

Reloads rewrite the files: `ctx_size` changes (a restart) and port swaps between two instances,
which only work if every old process is gone before a new one starts."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mi50d.config import load_config
from mi50d.engine.desired import Goal, Verdict
from mi50d.engine.events import Event
from mi50d.engine.supervisor import Supervisor
from mi50d.host.accounts import account_for
from tests.support import fake_daemon, fake_env, free_port, supervising, toml_text

SLACK_S = 10.0  # on top of each request's own bound: scheduling on a loaded machine


class Watch:
    """Reads every event: the live (port, pid) of each instance, every pid ever spawned, and
    anything that must never happen."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[int, int]] = {}
        self.pids: set[int] = set()
        self.problems: list[str] = []

    def take(self, event: Event) -> None:
        if event["event"] == "line" and "Address already in use" in event["line"]:
            self.problems.append(f"{event['name']}: {event['line']}")
        if event["event"] != "state":
            return
        st = event["status"]
        if st["state"] == "failed":
            self.problems.append(f"{st['name']} failed: {st['reason']}")
        if st["pid"] is None:
            self.live.pop(st["name"], None)
            return
        self.pids.add(st["pid"])
        self.live[st["name"]] = (st["port"], st["pid"])
        ports = [port for port, _ in self.live.values()]
        if len(ports) != len(set(ports)):
            self.problems.append(f"two servers on one port: {self.live}")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _interleave(sup: Supervisor, directory: Path, tables: dict[str, dict[str, Any]],
                      rng: random.Random, clients: int, ops: int, start_bound_s: float) -> None:
    names = sorted(tables)
    goals = {n: Goal.DOWN for n in names}
    reload_lock = asyncio.Lock()  # the daemon serializes reloads the same way

    async def bounded(what: str, bound_s: float, work: Any) -> Any:
        try:
            async with asyncio.timeout(bound_s + SLACK_S):
                return await work
        except TimeoutError:
            raise AssertionError(f"{what}: no reply within {bound_s + SLACK_S:g}s") from None

    async def reload() -> None:
        async with reload_lock:
            a, b = rng.sample(names, 2)
            if rng.random() < 0.5:
                tables[a]["port"], tables[b]["port"] = tables[b]["port"], tables[a]["port"]
            else:
                tables[a]["ctx_size"] = 512 if tables[a].get("ctx_size") != 512 else 256
            for name, table in tables.items():
                (directory / f"{name}.toml").write_text(toml_text(table))
            new = load_config(directory)
            await bounded("reload", max(i.stop_bound_s() for i in map(sup.get, names)),
                          sup.apply(new, account_for(new)))

    async def client() -> None:
        for _ in range(ops):
            await asyncio.sleep(rng.random() * 0.05)
            name = rng.choice(names)
            op = rng.choice(("start", "start", "stop", "restart", "reload"))
            inst = sup.get(name)
            if op == "start":
                timeout = rng.choice((0.01, 1.0, start_bound_s))
                goals[name] = Goal.UP  # recorded by the call below before it awaits
                reply = await bounded("start", timeout, sup.ensure_running(name, timeout))
                assert reply.verdict in (Verdict.REACHED, Verdict.SUPERSEDED, Verdict.TIMEOUT)
            elif op == "stop":
                goals[name] = Goal.DOWN
                reply = await bounded("stop", inst.stop_bound_s(), sup.ensure_stopped(name))
                assert reply.verdict in (Verdict.REACHED, Verdict.SUPERSEDED), reply
            elif op == "restart":
                goals[name] = Goal.UP
                reply = await bounded("restart", inst.stop_bound_s(), sup.restart(name))
                assert reply.verdict in (Verdict.REACHED, Verdict.SUPERSEDED), reply
            else:
                await reload()

    await asyncio.gather(*(client() for _ in range(clients)))
    assert {n: sup.get(n).goal for n in names} == goals
    for name in names:  # converge on the last word; these requests repeat it
        if goals[name] is Goal.UP:
            reply = await bounded("final start", start_bound_s,
                                  sup.ensure_running(name, start_bound_s))
            assert reply.verdict is Verdict.REACHED, reply
        else:
            assert (await bounded("final stop", 60, sup.ensure_stopped(name))).ok


async def _run(tmp_path: Path, daemon: dict[str, Any], tables: dict[str, dict[str, Any]],
               seed: int, clients: int, ops: int, start_bound_s: float) -> None:
    directory = tmp_path / "conf"
    directory.mkdir()
    (directory / "mi50d.toml").write_text(toml_text({"user": _user(), **daemon}))
    for name, table in tables.items():
        (directory / f"{name}.toml").write_text(toml_text(table))
    watch = Watch()
    async with supervising(directory) as (sup, _):
        with sup.events.subscribe(size=100_000) as sub:
            work = asyncio.ensure_future(_interleave(sup, directory, tables, random.Random(seed),
                                                     clients, ops, start_bound_s))
            reader = asyncio.ensure_future(_read(sub.get, watch))
            try:
                await work
            finally:
                reader.cancel()
            while not sub.queue.empty():
                watch.take(sub.take_nowait())
        assert watch.problems == []
        for name in tables:
            assert (await sup.ensure_stopped(name)).ok
    assert watch.pids, "something ran"
    assert [p for p in watch.pids if _alive(p)] == []


async def _read(get: Callable[[], Any], watch: Watch) -> None:
    while True:
        watch.take(await get())


def _user() -> str:
    import getpass

    return getpass.getuser()


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_interleavings_fake(tmp_path: Path, seed: int) -> None:
    tables = {name: {"model": "/dev/null", "port": free_port(), "ctx_size": 256,
                     "env": fake_env(FAKE_LOAD_S=0.05 * i), "stop": {"timeout_s": 2}}
              for i, name in enumerate(("a", "b", "c"))}
    await _run(tmp_path, fake_daemon(), tables, seed, clients=4, ops=15, start_bound_s=30)


@pytest.mark.llama
@pytest.mark.asyncio
async def test_random_interleavings_real(tmp_path: Path, llama_server: Path,
                                         tiny_model: Path) -> None:
    tables = {name: {"model": str(tiny_model), "port": free_port(), "ctx_size": 256,
                     "threads": 1, "n_gpu_layers": 0, "stop": {"timeout_s": 5}}
              for name in ("a", "b")}
    await _run(tmp_path, {"llama_server": str(llama_server), "preflight": False}, tables,
               seed=7, clients=3, ops=10, start_bound_s=120)


def test_random_interleavings_over_the_control_socket(tmp_path: Path) -> None:
    """The same through mi50d's control socket from parallel client threads (the handlers'
    start with wait and a timeout, stop, restart, reload), then SIGTERM: the daemon exits 0."""
    import threading

    from mi50ctl.client import Client
    from tests.ctlsupport import fake_instance, running_daemon

    rng = random.Random(11)
    names = ("a", "b", "c")
    tables = {n: fake_instance(free_port(), ctx_size=256, stop={"timeout_s": 2}) for n in names}
    errors: list[str] = []
    lock = threading.Lock()
    with running_daemon({}, tables) as daemon:
        def client(seed: int) -> None:
            local = random.Random(seed)
            ctl = Client(str(daemon.socket))
            for _ in range(8):
                name, op = local.choice(names), local.choice(("start", "stop", "restart",
                                                               "reload"))
                try:
                    if op == "start":
                        frames = list(ctl.stream("start", {"name": name, "timeout_s": 5.0},
                                                 timeout_s=60))
                        outcome = frames[-1].result["outcome"]  # type: ignore[union-attr]
                        if outcome not in ("running", "failed", "timeout"):
                            errors.append(f"start {name}: {outcome}")
                    elif op == "reload":
                        with lock:
                            table = tables[name]
                            table["ctx_size"] = 512 if table["ctx_size"] == 256 else 256
                            (daemon.config / f"{name}.toml").write_text(toml_text(table))
                            ctl.call("reload", {}, timeout_s=60)
                    else:
                        ctl.call(op, {"name": name}, timeout_s=60)
                except Exception as exc:  # collected: a thread cannot fail the test itself
                    errors.append(f"{op} {name}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a client never got its reply"
        assert errors == []
        status = Client(str(daemon.socket)).call("status", {}, timeout_s=60)
        assert all(st["state"] in ("running", "stopped", "starting")
                   for st in status["instances"]), status
        log = daemon.log_text()
        assert "Address already in use" not in log and "new=failed" not in log
        assert daemon.stop() == 0
