"""Instances as systemd units (`mi50d@NAME.service`) under real systemd: they survive mi50d.

One container boots for the module (the cached Debian 12 root of `nspawn_harness`, the .deb
installed, the package's default: units). The tests run in file order, as an operator's steps.
Waits are on observed state (a pid, a unit property, an HTTP answer), bounded by a timeout; no
test asserts how long anything took. `/health` is probed every 100 ms by a loop inside the
container (a transient unit of its own), whose every answer is then checked.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.nspawn_harness import (
    HOST_DIR_IN_CONTAINER,
    Machine,
    build_deb,
    debian_root,
    poll,
)
from tests.systemd.test_systemd_e2e import (
    LLAMA_DIR,
    MODEL,
    TINY2_PORT,
    TINY_PORT,
    _have_root_tools,
    active,
    ctl,
    ensure_users,
    healthy,
    instance_toml,
    main_pid,
    pid_on_port,
    reinstall,
    server_pids,
)
from tests.systemd.test_systemd_e2e import llama as llama  # the module-scoped fixture

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
PROBE_LOG = "/run/e2e-probe.log"
PROBE_UNIT = "e2e-probe.service"


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory,
      llama: tuple[Path, Path] | None) -> Iterator[Machine]:
    if not _have_root_tools():
        pytest.skip("needs systemd-container, debootstrap, dpkg-dev, dh-virtualenv")
    if llama is None:
        pytest.skip("needs the llama_server and tiny_model fixtures from tests/conftest.py")
    root = debian_root()
    deb = build_deb(REPO)
    host = tmp_path_factory.mktemp("units-host")
    host.chmod(0o755)
    shutil.copy2(deb, host / deb.name)
    shutil.copytree(llama[0].parent, host / "llama-bin", symlinks=True)
    (host / "models").mkdir(mode=0o755)
    try:
        (host / "models" / "tiny.gguf").hardlink_to(llama[1])
    except OSError:
        shutil.copy2(llama[1], host / "models" / "tiny.gguf")
    machine = Machine(root, host, host.parent / "console.log")
    try:
        machine.wait_booted()
        machine.run("apt-get", "install", "-y", "--no-install-recommends",
                    f"{HOST_DIR_IN_CONTAINER}/{deb.name}", timeout=300)
        # Test-only: these steps start and stop mi50d more often than systemd's default
        # start rate limit (5 in 10 s) allows; what they test is not that limit.
        machine.write("/etc/systemd/system/mi50d.service.d/50-e2e.conf",
                      "[Unit]\nStartLimitIntervalSec=0\n[Service]\nTimeoutStartSec=45s\n")
        machine.run("systemctl", "daemon-reload")
        machine.sh(f"mkdir -p {LLAMA_DIR} && cp -a {HOST_DIR_IN_CONTAINER}/llama-bin/. "
                   f"{LLAMA_DIR}/")
        machine.write("/etc/mi50d/tiny.toml", instance_toml(MODEL, TINY_PORT))
        machine.write("/etc/mi50d/tiny2.toml", instance_toml(MODEL, TINY2_PORT))
        ensure_users(machine)
        yield machine
    finally:
        (host.parent / "journal.txt").write_text(
            machine.run("journalctl", "-b", "--no-pager", check=False).stdout
            if machine.nspawn.poll() is None else "")
        machine.poweroff()


def unit_pid(m: Machine, name: str) -> int:
    return int(m.show(f"mi50d@{name}.service", "MainPID") or 0)


def status_of(m: Machine, name: str) -> dict[str, object]:
    out = json.loads(ctl(m, "status", name, "--json", check=False))
    (st,) = out["instances"]
    assert isinstance(st, dict)
    return st


def running(m: Machine, name: str, port: int) -> int:
    """Ask for `name` to run; return its pid once /health answers 200."""
    if active(m) != "active":
        m.run("systemctl", "start", "mi50d.service", timeout=120)
    ctl(m, "start", name)
    poll(f"{name} to answer /health", lambda: healthy(m, port), timeout=120)
    pid = pid_on_port(m, port)
    assert pid is not None
    return pid


def start_probe(m: Machine, port: int) -> None:
    m.run("rm", "-f", PROBE_LOG)
    m.run("systemd-run", f"--unit={PROBE_UNIT}", "--quiet", "/bin/sh", "-c",
          f"while :; do curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 5 "
          f"http://127.0.0.1:{port}/health >> {PROBE_LOG}; sleep 0.1; done")


def stop_probe(m: Machine) -> list[str]:
    m.run("systemctl", "stop", PROBE_UNIT, check=False)
    return m.run("cat", PROBE_LOG, check=False).stdout.split()


def parent_of(m: Machine, pid: int) -> int:
    return int(m.run("ps", "-o", "ppid=", "-p", str(pid)).stdout.strip())


def new_main_after(m: Machine, old: int) -> None:
    poll("systemd to restart mi50d",
         lambda: active(m) == "active" and main_pid(m) not in (0, old), timeout=120)


# ---------------------------------------------------------------------------------------------


def test_1_instance_runs_as_its_own_unit(m: Machine) -> None:
    pid = running(m, "tiny", TINY_PORT)
    assert unit_pid(m, "tiny") == pid
    assert parent_of(m, pid) == 1  # systemd's child, not mi50d's
    assert m.show("mi50d@tiny.service", "User") == m.run("id", "-u", "mi50d").stdout.strip()
    groups = m.run("ps", "-o", "supgrp=", "-p", str(pid)).stdout.split(",")
    assert {"render", "video"} <= {g.strip() for g in groups}
    assert m.show("mi50d@tiny.service", "KillMode") == "mixed"
    assert m.show("mi50d@tiny.service", "TimeoutStopUSec") == "3s"
    assert "llama-server" in m.run("systemctl", "status", "--no-pager", "mi50d@tiny.service",
                                   check=False).stdout
    assert m.journal("mi50d@tiny.service").strip()  # its output is under its unit
    assert "[tiny]" not in m.journal("mi50d.service")  # and only there, not again under mi50d
    # mi50d follows the unit's journal (woken by journald's inotify), so its lines reach
    # `mi50ctl logs` a moment after journalctl shows them (one CI run saw none yet): re-asked,
    # bounded.
    deadline = time.monotonic() + 10
    while not ctl(m, "logs", "tiny", "-n", "5").strip():
        assert time.monotonic() < deadline, "mi50ctl logs tiny showed no line within 10 s"
        time.sleep(0.2)
    for unit, bound in (("mi50d.service", 3.5), ("mi50d@tiny.service", 3.5)):
        out = m.run("systemd-analyze", "security", "--no-pager", unit, check=False).stdout
        match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", out)
        assert match, out[-2000:]
        print(f"systemd-analyze security {unit}: {match.group(1)}")  # noqa: T201
        assert float(match.group(1)) <= bound, out


def test_2_instance_survives_a_restart_of_mi50d(m: Machine) -> None:
    pid = running(m, "tiny", TINY_PORT)
    before = status_of(m, "tiny")
    lines_before = ctl(m, "logs", "tiny", "-n", "5").strip().splitlines()
    assert lines_before
    old_main = main_pid(m)
    start_probe(m, TINY_PORT)
    m.run("systemctl", "restart", "mi50d.service", timeout=120)
    assert main_pid(m) != old_main
    poll("tiny to be running again in mi50d's status",
         lambda: status_of(m, "tiny")["state"] == "running")
    answers = stop_probe(m)
    assert answers and set(answers) == {"200"}, answers
    after = status_of(m, "tiny")
    assert pid_on_port(m, TINY_PORT) == pid == after["pid"]
    assert isinstance(after["uptime_s"], float) and isinstance(before["uptime_s"], float)
    assert after["uptime_s"] >= before["uptime_s"]
    assert ctl(m, "logs", "tiny", "-n", "5").strip()
    assert set(lines_before) <= set(ctl(m, "logs", "tiny", "-n", "100000").splitlines())

def test_3_kill_9_of_mi50d_is_readopted_and_a_later_crash_restarted(m: Machine) -> None:
    pid = running(m, "tiny", TINY_PORT)
    old_main = main_pid(m)
    restarts = int(m.show("mi50d.service", "NRestarts"))
    start_probe(m, TINY_PORT)
    m.run("kill", "-KILL", str(old_main))
    new_main_after(m, old_main)
    assert int(m.show("mi50d.service", "NRestarts")) == restarts + 1
    poll("tiny re-adopted", lambda: status_of(m, "tiny")["state"] == "running")
    answers = stop_probe(m)
    assert answers and set(answers) == {"200"}, answers
    assert status_of(m, "tiny")["pid"] == pid == pid_on_port(m, TINY_PORT)
    # The adopted instance is still supervised: its crash is restarted.
    m.run("kill", "-KILL", str(pid))
    poll("a new tiny after its crash",
         lambda: pid_on_port(m, TINY_PORT) not in (None, pid) and healthy(m, TINY_PORT),
         timeout=120)
    assert unit_pid(m, "tiny") == pid_on_port(m, TINY_PORT)
    # And a hang: SIGSTOP, the health probes fail, mi50d kills the unit and starts a new one.
    frozen = pid_on_port(m, TINY_PORT)
    assert frozen is not None
    m.run("kill", "-STOP", str(frozen))
    poll("a new tiny after SIGSTOP",
         lambda: pid_on_port(m, TINY_PORT) not in (None, frozen) and healthy(m, TINY_PORT),
         timeout=120)
    assert frozen not in server_pids(m)


def test_4_files_changed_or_removed_while_mi50d_was_stopped(m: Machine) -> None:
    tiny = running(m, "tiny", TINY_PORT)
    tiny2 = running(m, "tiny2", TINY2_PORT)
    m.run("systemctl", "stop", "mi50d.service", timeout=120)
    assert pid_on_port(m, TINY_PORT) == tiny and pid_on_port(m, TINY2_PORT) == tiny2
    m.write("/etc/mi50d/tiny2.toml", instance_toml(MODEL, TINY2_PORT, ctx_size=256))
    m.run("systemctl", "start", "mi50d.service", timeout=120)
    poll("tiny2 restarted with its new file",
         lambda: pid_on_port(m, TINY2_PORT) not in (None, tiny2) and healthy(m, TINY2_PORT),
         timeout=120)
    assert "256" in m.run("cat", f"/proc/{pid_on_port(m, TINY2_PORT)}/cmdline").stdout
    assert pid_on_port(m, TINY_PORT) == tiny

    m.run("systemctl", "stop", "mi50d.service", timeout=120)
    m.run("rm", "/etc/mi50d/tiny2.toml")
    m.run("systemctl", "start", "mi50d.service", timeout=120)
    poll("tiny2 stopped once its file is gone", lambda: pid_on_port(m, TINY2_PORT) is None)
    poll("mi50d@tiny2 gone", lambda: active(m, "mi50d@tiny2.service") == "inactive")
    assert pid_on_port(m, TINY_PORT) == tiny
    m.write("/etc/mi50d/tiny2.toml", instance_toml(MODEL, TINY2_PORT))
    m.run("systemctl", "reload", "mi50d.service")


def test_5_instance_dead_while_mi50d_was_down_is_restarted_by_policy(m: Machine) -> None:
    tiny = running(m, "tiny", TINY_PORT)
    m.run("systemctl", "stop", "mi50d.service", timeout=120)
    m.run("kill", "-KILL", str(tiny))
    poll("mi50d@tiny to fail", lambda: active(m, "mi50d@tiny.service") == "failed")
    m.run("systemctl", "start", "mi50d.service", timeout=120)
    poll("tiny started again",
         lambda: pid_on_port(m, TINY_PORT) not in (None, tiny) and healthy(m, TINY_PORT),
         timeout=120)
    st = status_of(m, "tiny")
    assert isinstance(st["restarts"], int) and st["restarts"] >= 1
    assert "signal 9" in str(st["last_exit"])


def test_6_upgrade_and_restart_reload_nothing(m: Machine) -> None:
    tiny = running(m, "tiny", TINY_PORT)
    reinstall(m)
    m.run("systemctl", "restart", "mi50d.service", timeout=120)
    poll("tiny adopted after the upgrade", lambda: status_of(m, "tiny")["state"] == "running")
    assert pid_on_port(m, TINY_PORT) == tiny


def test_7_stop_all_and_the_one_command_that_stops_everything(m: Machine) -> None:
    running(m, "tiny", TINY_PORT)
    running(m, "tiny2", TINY2_PORT)
    ctl(m, "stop", "--all")
    assert server_pids(m) == []
    running(m, "tiny", TINY_PORT)
    m.run("systemctl", "stop", "mi50d.service", "mi50d@*.service", timeout=120)
    assert server_pids(m) == []
    assert active(m) == "inactive"


def test_7_systemctl_stop_or_restart_of_one_instance_is_the_users_word(m: Machine) -> None:
    tiny = running(m, "tiny", TINY_PORT)
    tiny2 = running(m, "tiny2", TINY2_PORT)
    restarts = status_of(m, "tiny")["restarts"]
    # systemd's stop job, not a crash: mi50d's restart policy (always, 0.5 s) must not undo it.
    m.run("systemctl", "stop", "mi50d@tiny.service", timeout=60)
    poll("tiny stopped in mi50d's status", lambda: status_of(m, "tiny")["state"] == "stopped")
    assert "systemctl stop mi50d@tiny.service" in str(status_of(m, "tiny")["reason"])
    time.sleep(4 * 0.5)  # four restart delays: a restart by policy would have begun by now
    assert pid_on_port(m, TINY_PORT) is None
    assert status_of(m, "tiny")["state"] == "stopped"
    assert active(m, "mi50d@tiny.service") in ("inactive", "unknown")
    assert pid_on_port(m, TINY2_PORT) == tiny2  # the other instance untouched
    running(m, "tiny", TINY_PORT)  # mi50ctl start brings it back
    # systemctl restart: a new process in the same unit, which mi50d follows (no policy restart).
    before = unit_pid(m, "tiny")
    m.run("systemctl", "restart", "mi50d@tiny.service", timeout=60)
    poll("mi50d to follow the restarted unit",
         lambda: status_of(m, "tiny")["state"] == "running"
         and status_of(m, "tiny")["pid"] == unit_pid(m, "tiny") != before, timeout=120)
    poll("the restarted tiny to answer", lambda: healthy(m, TINY_PORT), timeout=120)
    assert status_of(m, "tiny")["restarts"] == restarts
    assert tiny not in server_pids(m)
    # The glob stops them all, and they stay stopped.
    m.run("systemctl", "stop", "mi50d@*.service", timeout=60)
    poll("both stopped", lambda: all(status_of(m, n)["state"] == "stopped"
                                     for n in ("tiny", "tiny2")))
    time.sleep(4 * 0.5)
    assert server_pids(m) == []
    assert active(m) == "active"  # mi50d itself keeps running


CONNECT_FROM = (  # run in the container's network namespace with the host's python3
    "import socket, sys\n"
    "s = socket.socket()\n"
    "s.settimeout(3)\n"
    "s.bind((sys.argv[1], 0))\n"
    "try:\n"
    "    s.connect((sys.argv[2], int(sys.argv[3])))\n"
    "    s.sendall(bytes([14]) + (24).to_bytes(8, 'little') + bytes(24))\n"
    "    a = b''\n"
    "    while len(a) < 11:  # the size (8 bytes), then the version; maybe in two sends\n"
    "        got = s.recv(64)\n"
    "        if not got:\n"
    "            break\n"
    "        a += got\n"
    "    print('answered', '.'.join(str(b) for b in a[8:11]))\n"
    "except OSError as exc:\n"
    "    print(type(exc).__name__)\n")
WORKER_PORT = 18090


def test_7c_rpc_worker_unit_lets_only_allowed_clients_in(m: Machine, rpc_bin: Path) -> None:
    """`allow` on a worker unit is the kernel's, twice: the unit's privileged ExecStartPre=
    installs the nftables table (a refused client gets a TCP reset), and IPAddressAllow= with
    IPAddressDeny=any drops what gets past it (seen once the table is deleted by hand). Three
    addresses of the container: the worker's own, one in allow, one not."""
    shutil.copytree(rpc_bin, m.host_dir / "rpc-bin", symlinks=True, dirs_exist_ok=True)
    rpc_server = f"{HOST_DIR_IN_CONTAINER}/rpc-bin/ggml-rpc-server"
    net = ["nsenter", "-t", str(m.init_pid), "-n", "--"]
    # A veth pair (kernels without the dummy module have veth): addresses on one end are the
    # container's own, reached over its loopback.
    subprocess.run([*net, "ip", "link", "add", "e2e0", "type", "veth", "peer", "name", "e2e1"],
                   check=True)
    for address in ("10.99.0.5", "10.99.0.6", "10.99.0.7"):
        subprocess.run([*net, "ip", "addr", "add", f"{address}/24", "dev", "e2e0"], check=True)
    for link in ("e2e0", "e2e1"):
        subprocess.run([*net, "ip", "link", "set", link, "up"], check=True)
    m.write("/etc/mi50d/w.toml", f'kind = "rpc-worker"\nhost = "10.99.0.5"\n'
            f'port = {WORKER_PORT}\nallow = ["10.99.0.7"]\nrpc_server = "{rpc_server}"\n')

    def connect(source: str) -> str:
        return subprocess.run([*net, sys.executable, "-c", CONNECT_FROM, source,
                               "10.99.0.5", str(WORKER_PORT)], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()

    try:
        m.run("systemctl", "reload" if active(m) == "active" else "start", "mi50d.service",
              timeout=120)
        ctl(m, "start", "w")
        poll("the worker to run", lambda: status_of(m, "w")["state"] == "running", timeout=120)
        assert "10.99.0.7/32" in m.show("mi50d@w.service", "IPAddressAllow")
        table = m.run("nft", "list", "table", "inet", "mi50d_w").stdout
        assert f"tcp dport {WORKER_PORT} ip saddr" in table and "10.99.0.7" in table
        assert connect("10.99.0.7") == "answered 7.0.0"
        assert connect("10.99.0.6") == "ConnectionRefusedError"  # nftables' TCP reset
        assert connect("10.99.0.7") == "answered 7.0.0"  # and the worker is fine after it
        m.run("nft", "delete", "table", "inet", "mi50d_w")
        assert connect("10.99.0.6") == "TimeoutError"  # the unit's BPF filter dropped the SYN
        assert connect("10.99.0.7") == "answered 7.0.0"
        ctl(m, "stop", "w")
        assert m.run("nft", "list", "table", "inet", "mi50d_w", check=False).returncode != 0
    finally:
        ctl(m, "stop", "w", check=False)
        m.run("rm", "-f", "/etc/mi50d/w.toml")
        m.run("systemctl", "reload", "mi50d.service", timeout=120, check=False)


def test_8_package_removal_stops_instances(m: Machine) -> None:
    running(m, "tiny", TINY_PORT)
    m.run("apt-get", "remove", "-y", "mi50d", timeout=300)
    assert server_pids(m) == []
    assert m.run("systemctl", "list-units", "--all", "--no-legend", "mi50d@*",
                 check=False).stdout.strip() == ""
