"""`mi50d --check-config` and the account instances run as."""

from __future__ import annotations

import getpass
import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ctlsupport import fake_instance, running_daemon
from tests.support import fake_daemon, fake_env, free_port, supervising, write_config

MI50D = str(Path(sys.executable).with_name("mi50d"))
FIXTURES = Path(__file__).parent / "fixtures" / "config"


def test_check_config_prints_the_exact_command_line() -> None:
    out = subprocess.run([MI50D, "--check-config", "--config-dir", str(FIXTURES / "good")],
                         capture_output=True, text=True, check=True).stdout
    assert "[gpt-oss-20b] autostart=false" in out
    assert ("HSA_OVERRIDE_GFX_VERSION=9.0.6 ROCR_VISIBLE_DEVICES=0 /opt/llama/bin/llama-server "
            "--model /mnt/ssd/models/gpt-oss-20b-mxfp4.gguf --host 0.0.0.0 --port 8080") in out


def test_check_config_json() -> None:
    out = subprocess.run([MI50D, "--check-config", "--json", "--config-dir", str(FIXTURES / "good")],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    inst = doc["instances"]["gpt-oss-20b"]
    assert inst["env"] == {"ROCR_VISIBLE_DEVICES": "0", "HSA_OVERRIDE_GFX_VERSION": "9.0.6"}
    assert inst["argv"][-1] == "--no-webui"


def test_broken_config_exits_78_naming_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "tiny.toml").write_text('model = "/m.gguf"\nport = 99999\n')
    proc = subprocess.run([MI50D, "--config-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 78
    assert "mi50d: tiny.toml: port: Input should be less than or equal to 65535" in proc.stderr
    assert "Traceback" not in proc.stderr


def _proc_environ(pid: int | None) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _proc_status(pid: int | None) -> dict[str, list[str]]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.split() for k, v in (line.split(":", 1) for line in lines)}


@pytest.mark.skipif(os.geteuid() != 0, reason="switching accounts needs root")
@pytest.mark.asyncio
async def test_instances_run_as_the_configured_user(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    cfg = write_config(tmp_path, fake_daemon(user="nobody"), {
        "sandboxed": {"model": "/dev/null", "port": free_port(), "autostart": True,
                      "env": fake_env()}})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("sandboxed", "running")
        pid = sup.status("sandboxed")[0].pid
        fields = _proc_status(pid)
        assert fields["Uid"][:2] == [str(nobody.pw_uid)] * 2
        assert fields["Gid"][:2] == [str(nobody.pw_gid)] * 2
        # Not the daemon's groups: root's supplementary groups are not inherited.
        assert "0" not in fields.get("Groups", [])
        env = _proc_environ(pid)
        assert (env["HOME"], env["USER"]) == (nobody.pw_dir, "nobody")


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching accounts needs root")
def test_kill_9_of_the_daemon_kills_children_running_as_another_user(tmp_path: Path) -> None:
    """The kernel clears the parent-death signal when a process changes uid, so mi50d must set it
    after switching to the instance's account; this is that case, with a real SIGKILL."""
    cfg = write_config(tmp_path / "conf", fake_daemon(user="nobody"), {
        "sandboxed": {"model": "/dev/null", "port": free_port(), "autostart": True,
                      "env": fake_env()}})
    with subprocess.Popen([MI50D, "--config-dir", str(cfg), "--socket", str(tmp_path / "s")],
                          stderr=subprocess.PIPE) as daemon:
        assert daemon.stderr is not None
        for raw in daemon.stderr:  # the daemon's log is the contract
            if b"new=running" in raw:
                break
        (child,) = _children(daemon.pid)
        assert _proc_status(child)["Uid"][0] == str(pwd.getpwnam("nobody").pw_uid)
        daemon.kill()
        daemon.wait()
        for _ in range(200):  # the kernel delivers SIGKILL as the daemon exits
            if not _alive(child):
                break
            time.sleep(0.05)
        assert not _alive(child)


MISSING_USER = ("mi50d.toml: user: user 'no-such-user' does not exist; create it (the mi50d "
                "package does: adduser --system --group no-such-user) or set `user` in mi50d.toml")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches accounts")
def test_a_user_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, fake_daemon(user="no-such-user"), {
        "a": {"model": "/dev/null", "port": free_port()}})
    for extra in ([], ["--check-config"]):
        proc = subprocess.run([MI50D, "--config-dir", str(cfg), *extra],
                              capture_output=True, text=True)
        assert proc.returncode == 78
        assert proc.stderr.splitlines()[0] == f"mi50d: {MISSING_USER}"
        assert "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="only root switches accounts")
def test_reload_to_a_missing_user_keeps_the_running_set() -> None:
    port = free_port()
    with running_daemon({"wait_ready": True}, {"a": fake_instance(port, autostart=True)}) as d:
        before = json.loads(d.ctl("status", "--json").stdout)["instances"][0]
        assert before["state"] == "running"
        conf = d.config / "mi50d.toml"
        conf.write_text(conf.read_text().replace(f'user = "{getpass.getuser()}"',
                                                 'user = "no-such-user"'))
        rejected = d.ctl("reload")
        assert rejected.returncode == 78
        assert MISSING_USER in rejected.stderr
        after = json.loads(d.ctl("status", "--json").stdout)["instances"][0]
        assert (after["state"], after["pid"]) == ("running", before["pid"])
