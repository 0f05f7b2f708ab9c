"""Fault injection against the supervision engine with the scriptable fake server (real processes,
real sockets, real signals). The real llama-server is exercised in test_engine_real.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import fake_daemon, fake_env, free_port, supervising, write_config

pytestmark = pytest.mark.asyncio


def _inst(port: int, env: dict[str, str], **extra: object) -> dict[str, object]:
    return {"model": "/dev/null", "port": port, "autostart": True, "env": env, **extra}


async def test_slow_load_beyond_start_timeout_fails(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_daemon(), {"slow": _inst(
        free_port(), fake_env(FAKE_LOAD_S=30),
        health={"start_timeout_s": 0.5}, restart={"policy": "never"})})
    async with supervising(cfg) as (sup, rec):
        seq = await rec.wait("slow", "failed")
        assert seq == ["stopped", "starting", "failed"]
        (st,) = sup.status("slow")
        assert "not ready within start_timeout_s=0.5" in st.reason
        assert st.last_exit == "signal 9 (SIGKILL)"
        assert st.pid is None


async def test_exit_during_load_is_retried_then_gives_up(tmp_path: Path) -> None:
    line = "fake llama-server: something went wrong"
    cfg = write_config(tmp_path, fake_daemon(), {"broken": _inst(
        free_port(), fake_env(FAKE_LOAD_S=0.2, FAKE_FAIL_LOAD=line),
        restart={"policy": "on-failure", "delay_s": 0, "burst": 1})})
    async with supervising(cfg) as (sup, rec):
        seq = await rec.wait("broken", "failed")
        # burst 1: the first failed start is retried once, the second gives up
        assert seq == ["stopped", "starting", "backoff", "starting", "failed"]
        (st,) = sup.status("broken")
        assert "exited during start (exit 1)" in st.reason
        assert "2 ends within 120s (burst 1)" in st.reason
        assert line in st.last_lines


async def test_known_fatal_load_error_is_diagnosed_and_not_retried(tmp_path: Path) -> None:
    line = "llama_model_load: error loading model: tensor 'x' data is not within the file bounds"
    cfg = write_config(tmp_path, fake_daemon(), {"truncated": _inst(
        free_port(), fake_env(FAKE_LOAD_S=0.2, FAKE_FAIL_LOAD=line),
        restart={"policy": "always", "delay_s": 0})})
    async with supervising(cfg) as (sup, rec):
        seq = await rec.wait("truncated", "failed")
        assert seq == ["stopped", "starting", "failed"]
        (st,) = sup.status("truncated")
        assert st.diagnosis is not None
        assert st.diagnosis.startswith("the model file is truncated (tensor x lies beyond its end)")
        assert "not retried" in st.reason
        assert line in st.last_lines


async def test_sigterm_ignored_means_sigkill_after_stop_timeout(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_daemon(), {"stubborn": _inst(
        free_port(), fake_env(FAKE_IGNORE_TERM=1), stop={"timeout_s": 0.5})})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("stubborn", "running")
        (st,) = sup.status("stubborn")
        assert st.pid is not None
        pid = st.pid
        await sup.stop("stubborn")
        assert rec.sequence("stubborn") == ["stopped", "starting", "running", "stopping", "stopped"]
        (st,) = sup.status("stubborn")
        assert st.last_exit == "signal 9 (SIGKILL)"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_flapping_gives_up_after_burst(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_daemon(), {"flappy": _inst(
        free_port(), fake_env(FAKE_EXIT_AFTER_S=0.5, FAKE_EXIT_CODE=3),
        restart={"policy": "always", "delay_s": 0, "burst": 3, "interval_s": 60})})
    async with supervising(cfg) as (sup, rec):
        seq = await rec.wait("flappy", "failed")
        assert seq == ["stopped", *["starting", "running", "backoff"] * 3, "starting", "running", "failed"]
        (st,) = sup.status("flappy")
        assert st.restarts == 3
        assert "4 ends within 60s (burst 3)" in st.reason
        assert st.last_exit == "exit 3"
        # A user start leaves FAILED with a fresh history.
        sup.start("flappy")
        await rec.wait("flappy", "running", count=5)


async def test_clean_exit_with_on_failure_stays_stopped(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_daemon(), {"done": _inst(
        free_port(), fake_env(FAKE_EXIT_AFTER_S=0.1, FAKE_EXIT_CODE=0))})
    async with supervising(cfg) as (sup, rec):
        seq = await rec.wait("done", "stopped", count=2)
        assert seq == ["stopped", "starting", "running", "stopped"]
        assert "exited cleanly" in sup.status("done")[0].reason


async def test_hang_after_ready_is_detected_and_restarted(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_daemon(), {"wedged": _inst(
        free_port(), fake_env(FAKE_HANG_AFTER_S=0.3),
        health={"interval_s": 0.2, "timeout_s": 0.2, "failures": 2},
        restart={"delay_s": 0})})
    async with supervising(cfg) as (sup, rec):
        first = await rec.wait("wedged", "running")
        pid = sup.status("wedged")[0].pid
        seq = await rec.wait("wedged", "running", count=2)
        assert seq[:7] == ["stopped", "starting", "running", "unhealthy", "backoff", "starting",
                           "running"]
        assert first
        assert any("hang: 2 health probes failed" in r for r in rec.reasons["wedged"])
        assert sup.status("wedged")[0].pid != pid


async def test_missing_binary_is_fatal_not_a_restart_storm(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_daemon(llama_server="/nonexistent/llama-server"),
                       {"nobin": _inst(free_port(), {})})
    async with supervising(cfg) as (sup, rec):
        seq = await rec.wait("nobin", "failed")
        assert seq == ["stopped", "starting", "failed"]
        assert "cannot execute /nonexistent/llama-server" in sup.status("nobin")[0].reason


async def test_stop_during_backoff(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_daemon(), {"slowretry": _inst(
        free_port(), fake_env(FAKE_EXIT_AFTER_S=0.5), restart={"delay_s": 60, "max_delay_s": 60})})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("slowretry", "backoff")
        await sup.stop("slowretry")
        assert rec.sequence("slowretry") == ["stopped", "starting", "running", "backoff", "stopped"]
