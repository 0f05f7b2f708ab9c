"""Nothing an instance does can take down its loop: each trigger from issue 10 (a NUL byte or an
'=' reaching spawn, a host name the resolver refuses, a 64 KiB status line, a crashing or blocking
preflight, a crashing diagnosis or state hook) leaves that instance FAILED with the cause in one
line, and stop, start, reload and shutdown all still complete within their bounds.

The configurations are altered past validation (`model_copy(update=...)`), so these tests hold
whatever `--check-config` learns to reject: the engine must survive them anyway."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mi50d.config import Config, load_config
from mi50d.engine.desired import Verdict
from mi50d.engine.run import Hooks
from mi50d.engine.supervisor import Supervisor
from tests.support import Recorder, fake_daemon, fake_env, free_port, supervising_config, write_config

pytestmark = pytest.mark.asyncio

BOUND_S = 30.0  # far above any stop here; a wedge would hang past it


def _config(tmp_path: Path, env: dict[str, Any] | None = None, preflight: bool = False,
            **extra: Any) -> Config:
    """One instance `x` of the fake server; with `preflight`, the daemon runs preflight hooks
    (each test puts its own in place)."""
    write_config(tmp_path, fake_daemon(preflight=preflight), {"x": {
        "model": "/dev/null", "port": free_port(), "env": fake_env(**(env or {})),
        "restart": {"policy": "never"}, **extra}})
    return load_config(tmp_path)


def _taint(config: Config, **update: Any) -> Config:
    inst = config.instances["x"].model_copy(update=update)
    return config.model_copy(update={"instances": {"x": inst}})


async def _still_controllable(sup: Supervisor, rec: Recorder, cause: str) -> None:
    """`x` failed with `cause`; a start fails again the same way, a stop and a reload return."""
    async with asyncio.timeout(BOUND_S):
        seq = await rec.wait("x", "failed")
        (st,) = sup.status("x")
        assert cause in st.reason, st.reason
        assert "\n" not in st.reason
        assert seq[-1] == "failed"
        again = await sup.ensure_running("x", timeout_s=BOUND_S)
        assert again.verdict is Verdict.FAILED and cause in again.reason
        stopped = await sup.ensure_stopped("x")
        assert stopped.verdict is Verdict.REACHED
        report = await sup.apply(sup.config, sup.account)
        assert report.unchanged == ["x"]
        # and once more after the reload: the loop still answers
        assert (await sup.ensure_running("x", timeout_s=BOUND_S)).verdict is Verdict.FAILED


async def test_nul_byte_in_an_env_value_fails_that_instance_only(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bad = _taint(config, env={**config.instances["x"].env, "BAD": "a\0b"}, autostart=True)
    async with asyncio.timeout(BOUND_S * 3), supervising_config(bad) as (sup, rec):
        await _still_controllable(sup, rec, "embedded null byte")


async def test_equals_sign_in_an_env_key(tmp_path: Path) -> None:
    config = _config(tmp_path)
    bad = _taint(config, env={**config.instances["x"].env, "A=B": "1"}, autostart=True)
    async with asyncio.timeout(BOUND_S * 3), supervising_config(bad) as (sup, rec):
        await _still_controllable(sup, rec, "cannot start")


async def test_nul_byte_in_llama_server(tmp_path: Path) -> None:
    config = _taint(_config(tmp_path), autostart=True)
    daemon = config.daemon.model_copy(update={"llama_server": Path("/usr/bin/py\0thon")})
    bad = config.model_copy(update={"daemon": daemon})
    async with asyncio.timeout(BOUND_S * 3), supervising_config(bad) as (sup, rec):
        await _still_controllable(sup, rec, "embedded null byte")


async def test_host_label_over_63_characters(tmp_path: Path) -> None:
    """The probe's resolver raises UnicodeError (not an OSError) for such a name."""
    bad = _taint(_config(tmp_path), host="a" * 64 + ".invalid", autostart=True)
    async with asyncio.timeout(BOUND_S * 3), supervising_config(bad) as (sup, rec):
        await _still_controllable(sup, rec, "unexpected error in mi50d (UnicodeError")
        assert sup.status("x")[0].pid is None


async def test_status_line_over_64_kib_fails_the_probe_not_the_loop(tmp_path: Path) -> None:
    config = _config(tmp_path, env={"FAKE_HUGE_STATUS": 100_000}, autostart=True,
                     health={"start_timeout_s": 1.0})
    async with asyncio.timeout(BOUND_S * 3), supervising_config(config) as (sup, rec):
        await _still_controllable(sup, rec, "not ready within start_timeout_s=1")


async def test_a_server_that_stalls_after_the_200_headers_is_a_hang(tmp_path: Path) -> None:
    """The probe reads the whole answer: headers of a 200 without the body are a failed probe."""
    config = _config(tmp_path, env={"FAKE_STALL_AFTER_S": 0.3}, autostart=True,
                     health={"interval_s": 0.2, "timeout_s": 0.3, "failures": 2})
    async with asyncio.timeout(BOUND_S * 3), supervising_config(config) as (sup, rec):
        seq = await rec.wait("x", "failed")
        assert seq == ["stopped", "starting", "running", "unhealthy", "failed"]
        assert "hang: 2 health probes failed in a row (last: timed out after 0.3s)" in \
            sup.status("x")[0].reason


def _with_hooks(sup: Supervisor, **hooks: Any) -> None:
    sup.get("x").hooks = Hooks(**hooks)


def _raising(exc: Exception) -> Callable[..., Any]:
    def hook(*_: Any) -> Any:
        raise exc

    return hook


async def test_exception_raised_by_a_preflight_job(tmp_path: Path) -> None:
    """A crash inside a check (MemoryError in the VRAM estimate, say) is a failed preflight."""
    config = _config(tmp_path, preflight=True)
    async with asyncio.timeout(BOUND_S * 3), supervising_config(config) as (sup, rec):
        _with_hooks(sup, preflight=lambda *_: _raising(MemoryError("estimate")))
        sup.start("x")
        await _still_controllable(sup, rec, "a preflight check crashed (MemoryError: estimate)")
        assert sup.status("x")[0].last_exit is None  # nothing was spawned


async def test_exception_raised_while_building_the_preflight_job(tmp_path: Path) -> None:
    config = _config(tmp_path, preflight=True)
    async with asyncio.timeout(BOUND_S * 3), supervising_config(config) as (sup, rec):
        _with_hooks(sup, preflight=_raising(PermissionError(13, "Permission denied")))
        sup.start("x")
        await _still_controllable(sup, rec, "unexpected error in mi50d (PermissionError")


async def test_a_crashing_diagnosis_leaves_the_plain_failure(tmp_path: Path) -> None:
    config = _config(tmp_path, env={"FAKE_FAIL_LOAD": "boom"})
    async with asyncio.timeout(BOUND_S * 3), supervising_config(config) as (sup, rec):
        _with_hooks(sup, diagnose=lambda _conf: _raising(RecursionError("deep")))
        sup.start("x")
        await _still_controllable(sup, rec, "exited during start (exit 1)")
        assert sup.status("x")[0].diagnosis is None


async def test_a_crashing_state_hook_does_not_stop_the_loop(tmp_path: Path) -> None:
    config = _config(tmp_path)
    async with asyncio.timeout(BOUND_S * 3), supervising_config(config) as (sup, _):
        broken = threading.Event()

        def hook() -> None:
            if broken.is_set():
                raise RuntimeError("a view's bug")

        sup.on_change.append(hook)
        broken.set()
        assert (await sup.ensure_running("x", timeout_s=BOUND_S)).verdict is Verdict.REACHED
        assert (await sup.ensure_stopped("x")).verdict is Verdict.REACHED
        broken.clear()


async def test_a_blocked_preflight_times_out_and_a_stop_cuts_it_short(tmp_path: Path) -> None:
    """A FIFO as the model blocks open() for good; a job that never returns stands for it."""
    config = _config(tmp_path, preflight=True)
    release = threading.Event()
    async with asyncio.timeout(BOUND_S * 3), supervising_config(config) as (sup, rec):
        _with_hooks(sup, preflight=lambda *_: lambda: (release.wait(), None)[1])
        inst = sup.get("x")
        inst._preflight.timeout_s = 0.5
        try:
            reply = await sup.ensure_running("x", timeout_s=BOUND_S)
            assert reply.verdict is Verdict.FAILED
            assert "preflight did not finish within 0.5s" in reply.reason
            # The next start waits for the same blocked job instead of piling up threads.
            again = await sup.ensure_running("x", timeout_s=BOUND_S)
            assert "preflight did not finish" in again.reason
            assert sum(t.name == "preflight:x" for t in threading.enumerate()) == 1
            # A stop during a blocked preflight returns at once and spawns nothing.
            inst._preflight.timeout_s = BOUND_S * 10
            sup.start("x")
            await rec.wait("x", "starting", count=3)
            stopped = await sup.ensure_stopped("x")
            assert stopped.verdict is Verdict.REACHED and stopped.state == "stopped"
            assert sup.status("x")[0].last_exit is None and not inst.lines
        finally:
            release.set()
        # Once it is unblocked, a start goes through.
        _with_hooks(sup, preflight=lambda *_: lambda: None)
        assert (await sup.ensure_running("x", timeout_s=BOUND_S)).verdict is Verdict.REACHED
