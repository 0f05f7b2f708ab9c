"""The engine's promises as a user meets them, through a real mi50d and mi50ctl: misbehaving
servers (a 64 KiB status line, a stall after the 200 headers, a grandchild that ignores SIGTERM)
and a model that blocks preflight (a FIFO) never keep stop, reload, start --timeout or SIGTERM
from finishing; kept output is bounded in bytes; a reload applies daemon settings to instances it
leaves running."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from mi50d.config import load_config
from mi50d.engine.desired import Verdict
from mi50d.engine.output import MAX_LINE_BYTES, Lines, cut
from mi50d.host.accounts import account_for
from tests.ctlsupport import fake_instance, running_daemon, wait_until
from tests.support import fake_daemon, fake_env, free_port, supervising, toml_text, write_config

CTL_S = 60.0  # each mi50ctl call must finish well within this


def test_misbehaving_servers_never_block_stop_reload_or_sigterm() -> None:
    instances = {
        "huge": fake_instance(free_port(), autostart=True, env={"FAKE_HUGE_STATUS": "100000"}),
        "stall": fake_instance(free_port(), autostart=True, env={"FAKE_STALL_AFTER_S": "0.2"},
                               health={"interval_s": 0.2, "timeout_s": 0.3, "failures": 100}),
        "orphan": fake_instance(free_port(), autostart=True, stop={"timeout_s": 1},
                                env={"FAKE_GRANDCHILD": "1"}),
    }
    with running_daemon({}, instances) as d:
        wait_until(lambda: "instance=stall old=running new=unhealthy" in d.log_text(),
                   "the stalled server to be seen")
        start = d.ctl("start", "huge", "--timeout", "2", timeout=CTL_S)
        assert start.returncode != 0 and "still starting after 2s" in start.stderr
        reload = d.ctl("reload", timeout=CTL_S)
        assert reload.returncode == 0, reload.stderr
        stop = d.ctl("stop", "--all", timeout=CTL_S)
        assert stop.returncode == 0, stop.stderr
        again = d.ctl("start", "orphan", timeout=CTL_S)
        assert again.returncode == 0, again.stderr
        assert d.stop() == 0


def test_a_fifo_as_the_model_does_not_block_stop_or_sigterm() -> None:
    """Preflight opens the model; a FIFO blocks that open. A stop cuts the preflight short."""
    workdir = Path(tempfile.mkdtemp(prefix="m5f", dir="/tmp"))
    fifo = workdir / "model.gguf"
    os.mkfifo(fifo)
    try:
        inst = fake_instance(free_port(), autostart=True)
        inst["model"] = str(fifo)
        with running_daemon({"preflight": True}, {"fifo": inst}) as d:
            wait_until(lambda: "new=starting reason=preflight" in d.log_text(), "preflight")
            stop = d.ctl("stop", "fifo", timeout=CTL_S)
            assert stop.returncode == 0, stop.stderr
            assert "instance_spawned" not in d.log_text()
            assert d.stop() == 0
    finally:
        fifo.unlink()
        workdir.rmdir()


def test_kept_output_is_bounded_in_bytes() -> None:
    kept = Lines(max_lines=1000, max_bytes=10_000)
    for _ in range(100):
        kept.append("x" * 999)
    assert kept.bytes <= 10_000 and len(kept) == 10
    assert kept.tail(3) == ["x" * 999] * 3 and kept.tail(0) == []
    assert cut(b"y" * MAX_LINE_BYTES, 5) == "y" * MAX_LINE_BYTES + " [mi50d: 5 bytes cut]"


def test_a_huge_line_is_cut_and_logs_stay_small() -> None:
    junk = 3 * 1024 * 1024
    with running_daemon({}, {"junk": fake_instance(
            free_port(), autostart=True, env={"FAKE_JUNK_BYTES": str(junk)})}) as d:
        wait_until(lambda: "instance=junk old=starting new=running" in d.log_text(), "running")
        logs = d.ctl("logs", "junk", "-n", "100", timeout=CTL_S)
        assert logs.returncode == 0, logs.stderr
        cut_line = next(line for line in logs.stdout.splitlines() if line.startswith("jjj"))
        assert len(cut_line) < MAX_LINE_BYTES + 100
        assert f"[mi50d: {junk - MAX_LINE_BYTES} bytes cut]" in cut_line


@pytest.mark.asyncio
async def test_reload_applies_daemon_settings_to_untouched_instances(tmp_path: Path) -> None:
    port = free_port()
    table = {"model": "/dev/null", "port": port, "env": fake_env()}
    write_config(tmp_path, fake_daemon(), {"a": table})
    async with asyncio.timeout(120), supervising(tmp_path) as (sup, rec):
        assert (await sup.ensure_running("a", 60)).ok
        pid = sup.status("a")[0].pid
        sysfs = tmp_path / "sys"
        sysfs.mkdir()
        daemon = {**fake_daemon(preflight=True), "user": sup.config.daemon.user}
        (tmp_path / "mi50d.toml").write_text(toml_text(daemon) + f'\n[host]\nsysfs_root = "{sysfs}"\n')
        new = load_config(tmp_path)
        report = await sup.apply(new, account_for(new))
        assert report.unchanged == ["a"] and sup.status("a")[0].pid == pid  # not restarted
        inst = sup.get("a")
        assert inst.daemon.preflight and inst.daemon.host.sysfs_root == sysfs
        assert (await sup.ensure_stopped("a")).ok
        # The next start runs preflight, which the daemon now asks for: /dev/null is no GGUF.
        reply = await sup.ensure_running("a", 60)
        assert reply.verdict is Verdict.FAILED and "preflight failed" in reply.reason
        assert rec.sequence("a")[-2:] == ["starting", "failed"]
