"""mi50d's .deb under real systemd: install, supervise, reload, crash, watchdog, remove, purge.

One container boots per Debian release (`nspawn_harness`: bookworm's systemd 252 and trixie's
257, which bracket Ubuntu 24.04's 255; MI50D_E2E_SUITES picks, see `e2e_suites`) and the whole
module runs in it; the tests run in file order, as the steps an operator would take, and each
states what it needs at its start so a failure in one step leaves the next ones meaningful.
Waits are on observed state (a pid, a unit property, an HTTP answer), bounded by a timeout; no
test asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.nspawn_harness import (
    HOST_DIR_IN_CONTAINER,
    SUITES,
    Machine,
    build_deb,
    debian_root,
    poll,
)

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
LLAMA_DIR = "/var/lib/mi50d/llama/current/bin"  # DaemonConfig.llama_server's default lives here
SOCKET = "/run/mi50d/control.sock"
# The systemd each release ships (`systemctl --version`'s first line).
SYSTEMD_MAJOR = {"bookworm": 252, "trixie": 257}
TINY_PORT = 18080
TINY2_PORT = 18081
MOUNTED_PORT = 18082



def _have_root_tools() -> bool:
    return all(shutil.which(t) for t in ("systemd-nspawn", "debootstrap", "dpkg-buildpackage",
                                         "dh_virtualenv", "nsenter"))


@pytest.fixture(scope="module")
def llama(request: pytest.FixtureRequest) -> tuple[Path, Path] | None:
    """(llama-server binary, tiny GGUF): tests/conftest.py's `llama_server` and `tiny_model`
    fixtures, or MI50D_E2E_LLAMA_SERVER and MI50D_E2E_MODEL, or None (those steps skip)."""
    try:
        return (Path(request.getfixturevalue("llama_server")),
                Path(request.getfixturevalue("tiny_model")))
    except pytest.FixtureLookupError:
        pass
    server, model = os.environ.get("MI50D_E2E_LLAMA_SERVER"), os.environ.get("MI50D_E2E_MODEL")
    return (Path(server), Path(model)) if server and model else None


def e2e_suites() -> list[str]:
    """MI50D_E2E_SUITES (comma-separated, e.g. "trixie" or "bookworm,trixie"), else both."""
    text = os.environ.get("MI50D_E2E_SUITES", "")
    chosen = [s.strip() for s in text.split(",") if s.strip()] or list(SUITES)
    unknown = set(chosen) - set(SUITES)
    if unknown:
        raise pytest.UsageError(f"MI50D_E2E_SUITES: unknown {sorted(unknown)}; known: {SUITES}")
    return chosen


@pytest.fixture(scope="module", params=e2e_suites())
def suite(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, suite: str,
            llama: tuple[Path, Path] | None) -> Iterator[Machine]:
    if not _have_root_tools():
        pytest.skip("needs systemd-container, debootstrap, dpkg-dev, dh-virtualenv "
                    "(scripts/setup.sh installs them)")
    root = debian_root(suite)
    deb = build_deb(REPO, suite)
    host = tmp_path_factory.mktemp(f"e2e-host-{suite}")
    host.chmod(0o755)  # the mi50d user reads the model through it
    shutil.copy2(deb, host / deb.name)
    if llama is not None:
        shutil.copytree(llama[0].parent, host / "llama-bin", symlinks=True)
        (host / "models").mkdir(mode=0o755)
        try:  # the model may be hundreds of MB: link it when the file system allows
            os.link(llama[1], host / "models" / "tiny.gguf")
        except OSError:
            shutil.copy2(llama[1], host / "models" / "tiny.gguf")
    log = host.parent / f"console-{suite}.log"
    m = Machine(root, host, log)
    try:
        m.wait_booted()
        m.run("apt-get", "install", "-y", "--no-install-recommends",
              f"{HOST_DIR_IN_CONTAINER}/{deb.name}", timeout=300)
        # Test-only: a daemon that never says READY=1 fails within a minute, not 15. This
        # module tests instances as direct children (no orphans after kill -9 of mi50d);
        # test_units_e2e.py tests the packaged default, instances as systemd units.
        m.write("/etc/systemd/system/mi50d.service.d/50-e2e.conf",
                "[Service]\nTimeoutStartSec=45s\nEnvironment=MI50D_INSTANCES=children\n")
        m.run("systemctl", "daemon-reload")
        yield m
    finally:
        (host.parent / f"journal-{suite}.txt").write_text(
            m.run("journalctl", "-b", "--no-pager", check=False).stdout
            if m.nspawn.poll() is None else "")
        m.poweroff()


MODEL = f"{HOST_DIR_IN_CONTAINER}/models/tiny.gguf"


@pytest.fixture
def with_llama(machine: Machine, llama: tuple[Path, Path] | None) -> Machine:
    """The container with the CPU llama-server in place and a `tiny` instance file."""
    if llama is None:
        pytest.skip("needs the llama_server and tiny_model fixtures from tests/conftest.py")
    if not machine.exists(f"{LLAMA_DIR}/llama-server"):
        machine.sh(f"mkdir -p {LLAMA_DIR} && cp -a {HOST_DIR_IN_CONTAINER}/llama-bin/. {LLAMA_DIR}/")
    if not machine.exists("/etc/mi50d/tiny.toml"):
        machine.write("/etc/mi50d/tiny.toml", instance_toml(MODEL, TINY_PORT))
        if active(machine) == "active":
            reload_until_known(machine, "tiny")
    return machine


def reload_until_known(m: Machine, name: str) -> None:
    """`systemctl reload` signals the daemon and returns; wait until it knows `name`."""
    ensure_users(m)
    m.run("systemctl", "reload", "mi50d.service")
    poll(f"mi50d to know {name} after the reload",
         lambda: re.search(rf"^{re.escape(name)}\s", ctl(m, "status", check=False), re.M)
         is not None)


def instance_toml(model: str, port: int, extra: str = "", ctx_size: int = 512) -> str:
    # Short health and stop timeouts so a hang is noticed quickly; not a timing assertion.
    return (f'model = "{model}"\nport = {port}\nctx_size = {ctx_size}\nthreads = 1\n'
            f"n_gpu_layers = 0\n{extra}"
            "[health]\ninterval_s = 1.0\ntimeout_s = 1.0\nfailures = 2\n"
            "[restart]\ndelay_s = 0.5\nburst = 20\n"
            "[stop]\ntimeout_s = 3.0\n")


def active(m: Machine, unit: str = "mi50d.service") -> str:
    return m.run("systemctl", "is-active", unit, check=False).stdout.strip()


def start_daemon(m: Machine) -> None:
    m.run("systemctl", "start", "mi50d.service", timeout=120)
    assert active(m) == "active"


def main_pid(m: Machine) -> int:
    return int(m.show("mi50d.service", "MainPID"))


def server_pids(m: Machine) -> list[int]:
    return m.pids_of("llama-server")


def pid_on_port(m: Machine, port: int) -> int | None:
    """The llama-server listening on `port` (its --port argument), if any."""
    for pid in server_pids(m):
        args = m.run("cat", f"/proc/{pid}/cmdline", check=False).stdout.split("\0")
        if "--port" in args and args[args.index("--port") + 1] == str(port):
            return pid
    return None


def healthy(m: Machine, port: int) -> bool:
    proc = m.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://127.0.0.1:{port}/health", check=False)
    return proc.stdout.strip() == "200"


def ctl(m: Machine, *args: str, user: str = "alice", check: bool = True) -> str:
    return m.run("mi50ctl", *args, user=user, check=check, timeout=60).stdout


def ensure_users(m: Machine) -> None:
    if m.run("id", "alice", check=False).returncode != 0:
        m.run("useradd", "--create-home", "--groups", "mi50d", "alice")
        m.run("useradd", "--create-home", "bob")


def start_tiny(m: Machine) -> int:
    ensure_users(m)
    start_daemon(m)
    ctl(m, "start", "tiny")
    poll("tiny to answer /health with 200", lambda: healthy(m, TINY_PORT), timeout=120)
    pid = pid_on_port(m, TINY_PORT)
    assert pid is not None
    return pid


# ---------------------------------------------------------------------------------------------
# 0. The package itself


def test_the_release_runs_its_own_systemd(machine: Machine, suite: str) -> None:
    first = machine.run("systemctl", "--version").stdout.splitlines()[0]
    assert first.startswith(f"systemd {SYSTEMD_MAJOR[suite]} "), first


def test_package_installs_user_units_and_config(machine: Machine) -> None:
    m = machine
    groups = m.run("id", "-nG", "mi50d").stdout.split()
    assert {"mi50d", "render", "video"} <= set(groups)
    assert m.run("getent", "passwd", "mi50d").stdout.split(":")[6].strip() == "/usr/sbin/nologin"
    # The socket is enabled and listening; the service waits for the operator.
    assert m.run("systemctl", "is-enabled", "mi50d.socket").stdout.strip() == "enabled"
    assert active(m, "mi50d.socket") == "active"
    assert m.run("systemctl", "is-enabled", "mi50d.service",
                 check=False).stdout.strip() == "disabled"
    assert m.run("stat", "-c", "%a %U %G", SOCKET).stdout.split() == ["660", "root", "mi50d"]
    assert m.run("stat", "-c", "%U", "/var/lib/mi50d").stdout.strip() == "mi50d"
    conffiles = m.run("dpkg-query", "-W", "-f=${Conffiles}", "mi50d").stdout
    assert "/etc/mi50d/mi50d.toml" in conffiles
    # Examples are not instances: they sit one level down, not directly in /etc/mi50d.
    assert m.run("ls", "/etc/mi50d").stdout.split() == ["examples", "mi50d.toml"]
    assert "/etc/mi50d/examples/" in conffiles
    examples = m.run("ls", "/etc/mi50d/examples").stdout.split()
    assert examples and all(e.endswith(".toml") for e in examples)
    # The venv runs on the container's python3 and finds python3-gi (pydbus) from the system.
    m.run("/opt/venvs/mi50d/bin/python", "-c", "import gi, pydbus, pydantic, uvloop, mi50d")
    out = m.run("mi50d", "--config-dir", "/etc/mi50d", "--check-config").stdout
    assert "0 instances" in out


def test_examples_validate_as_instances(machine: Machine) -> None:
    """Each shipped example, copied alone into a config directory (as README says to do), is a
    valid instance that does not start by itself."""
    m = machine
    examples = m.run("ls", "/etc/mi50d/examples").stdout.split()
    assert examples
    for example in examples:
        m.sh(f"rm -rf /tmp/ex && mkdir /tmp/ex && cp /etc/mi50d/examples/{example} /tmp/ex/")
        resolved = json.loads(m.run("mi50d", "--config-dir", "/tmp/ex", "--check-config",
                                    "--json").stdout)
        (instance,) = resolved["instances"].values()
        assert instance["autostart"] is False, example


def test_hardening_exposure(machine: Machine) -> None:
    """`systemd-analyze security` on the installed unit; the score is recorded in README."""
    out = machine.run("systemd-analyze", "security", "--no-pager", "mi50d.service",
                      check=False).stdout
    match = re.search(r"Overall exposure level for mi50d\.service: (\d+\.\d+) (\w+)", out)
    assert match, out[-2000:]
    # README.md "systemd hardening" explains each setting left off; this catches regressions.
    assert float(match.group(1)) <= 3.5, out


def test_broken_config_at_startup_does_not_loop(machine: Machine) -> None:
    m = machine
    m.write("/etc/mi50d/broken.toml", 'model = "/x.gguf"\nport = "not a port"\n')
    try:
        m.run("systemctl", "start", "mi50d.service", check=False, timeout=120)
        poll("mi50d.service to fail", lambda: active(m) == "failed")
        assert m.show("mi50d.service", "ExecMainStatus") == "78"
        assert m.show("mi50d.service", "NRestarts") == "0"
        assert "broken.toml: port" in m.journal("mi50d.service")
    finally:
        m.run("rm", "-f", "/etc/mi50d/broken.toml")
        m.run("systemctl", "reset-failed", "mi50d.service", check=False)


# ---------------------------------------------------------------------------------------------
# 1. Enable and start


def test_1_enable_now_reports_status(machine: Machine) -> None:
    m = machine
    m.run("systemctl", "enable", "--now", "mi50d.service", timeout=120)
    assert active(m) == "active"
    assert m.run("systemctl", "is-enabled", "mi50d.service").stdout.strip() == "enabled"
    status = m.show("mi50d.service", "StatusText")
    assert re.fullmatch(r"0/0 running", status), status  # mi50d's summary; no instance yet
    assert m.show("mi50d.service", "NRestarts") == "0"


def reinstall(m: Machine) -> None:
    """Reinstall the same .deb: dpkg runs the upgrade paths of the maintainer scripts (prerm
    upgrade, postinst configure), the ones that would restart the daemon."""
    m.sh(f"apt-get install -y --reinstall {HOST_DIR_IN_CONTAINER}/mi50d_*.deb")


def test_1_upgrade_does_not_restart_the_daemon(machine: Machine) -> None:
    m = machine
    start_daemon(m)
    before, restarts = main_pid(m), m.show("mi50d.service", "NRestarts")
    reinstall(m)
    assert active(m) == "active"
    assert main_pid(m) == before
    assert m.show("mi50d.service", "NRestarts") == restarts
    assert active(m, "mi50d.socket") == "active"


# ---------------------------------------------------------------------------------------------
# 2. mi50ctl through the socket: group members may, others may not


def test_2_socket_refuses_users_outside_the_group(machine: Machine) -> None:
    m = machine
    ensure_users(m)
    connect = ("import socket; s = socket.socket(socket.AF_UNIX); "
               f"s.connect({SOCKET!r}); print('connected')")
    outsider = m.run("python3", "-c", connect, user="bob", check=False)
    assert outsider.returncode != 0
    assert "PermissionError" in outsider.stderr
    member = m.run("python3", "-c", connect, user="alice", check=False)
    assert member.stdout.strip() == "connected", member.stderr


def test_2_member_starts_an_instance_that_answers(with_llama: Machine) -> None:
    m = with_llama
    start_tiny(m)
    assert re.search(r"tiny\s.*running", ctl(m, "status"))
    reply = json.loads(m.run("curl", "-sf", f"http://127.0.0.1:{TINY_PORT}/completion",
                             "-d", '{"prompt": "Once upon a time", "n_predict": 4}').stdout)
    assert isinstance(reply["content"], str) and reply["tokens_predicted"] > 0
    refused = m.run("mi50ctl", "status", user="bob", check=False)
    assert refused.returncode != 0
    assert m.show("mi50d.service", "NRestarts") == "0"


# ---------------------------------------------------------------------------------------------
# 3. Crash and hang of llama-server


def test_3_killed_and_frozen_servers_are_restarted(with_llama: Machine) -> None:
    m = with_llama
    first = start_tiny(m)
    m.run("kill", "-KILL", str(first))
    poll("a new tiny after SIGKILL",
         lambda: pid_on_port(m, TINY_PORT) not in (None, first) and healthy(m, TINY_PORT),
         timeout=120)
    second = pid_on_port(m, TINY_PORT)
    assert second is not None
    m.run("kill", "-STOP", str(second))
    poll("a new tiny after SIGSTOP",
         lambda: pid_on_port(m, TINY_PORT) not in (None, second) and healthy(m, TINY_PORT),
         timeout=120)
    assert second not in server_pids(m)
    assert m.show("mi50d.service", "NRestarts") == "0"


# ---------------------------------------------------------------------------------------------
# 4. Reload


def test_4_reload_restarts_only_the_changed_instance(with_llama: Machine) -> None:
    m = with_llama
    tiny = start_tiny(m)
    m.write("/etc/mi50d/tiny2.toml",
            instance_toml(MODEL, TINY2_PORT, "autostart = true\n"))
    m.run("systemctl", "reload", "mi50d.service")
    poll("tiny2 to start on reload", lambda: healthy(m, TINY2_PORT), timeout=120)
    tiny2 = pid_on_port(m, TINY2_PORT)

    m.write("/etc/mi50d/tiny2.toml",
            instance_toml(MODEL, TINY2_PORT, "autostart = true\n", ctx_size=256))
    m.run("systemctl", "reload", "mi50d.service")
    poll("tiny2 to be restarted with its new file",
         lambda: pid_on_port(m, TINY2_PORT) not in (None, tiny2) and healthy(m, TINY2_PORT),
         timeout=120)
    assert pid_on_port(m, TINY_PORT) == tiny

    # A broken file: the error is reported, and nothing that runs is touched.
    tiny2 = pid_on_port(m, TINY2_PORT)
    m.write("/etc/mi50d/tiny2.toml", f'model = "{MODEL}"\nport = "x"\n')
    m.run("systemctl", "reload", "mi50d.service")
    poll("the rejected reload in the journal",
         lambda: "tiny2.toml: port" in m.journal("mi50d.service"))
    assert "tiny2.toml: port" in m.run("systemctl", "status", "--no-pager", "-n", "50",
                                       "mi50d.service", check=False).stdout
    assert active(m) == "active"
    assert pid_on_port(m, TINY_PORT) == tiny
    assert pid_on_port(m, TINY2_PORT) == tiny2
    m.run("rm", "/etc/mi50d/tiny2.toml")
    m.run("systemctl", "reload", "mi50d.service")
    poll("tiny2 to stop once its file is gone", lambda: pid_on_port(m, TINY2_PORT) is None)


# ---------------------------------------------------------------------------------------------
# 5. A model on a mount unit that is not mounted


MOUNT_UNIT = """[Unit]
Description=e2e: models on a mount that mi50d must start

[Mount]
What=/srv/e2e/models
Where=/mnt/models
Type=none
Options=bind,ro
"""


def test_5_instance_on_an_inactive_mount_unit(with_llama: Machine) -> None:
    m = with_llama
    m.run("mkdir", "-p", "/mnt/models")
    m.write("/etc/systemd/system/mnt-models.mount", MOUNT_UNIT)
    m.run("systemctl", "daemon-reload")
    assert active(m, "mnt-models.mount") == "inactive"
    m.write("/etc/mi50d/mounted.toml",
            instance_toml("/mnt/models/tiny.gguf", MOUNTED_PORT,
                          'requires_mounts = ["/mnt/models"]\n'))
    start_daemon(m)
    reload_until_known(m, "mounted")
    try:
        ctl(m, "start", "mounted")
        poll("the instance on /mnt/models to answer", lambda: healthy(m, MOUNTED_PORT),
             timeout=120)
        assert active(m, "mnt-models.mount") == "active"
    finally:
        ctl(m, "stop", "mounted", check=False)
        m.run("rm", "-f", "/etc/mi50d/mounted.toml")
        m.run("systemctl", "reload", "mi50d.service", check=False)


# ---------------------------------------------------------------------------------------------
# 6. The daemon dies; the daemon stops


def test_6_killed_daemon_is_restarted_without_orphans(with_llama: Machine) -> None:
    m = with_llama
    start_tiny(m)
    old_main = main_pid(m)
    restarts = int(m.show("mi50d.service", "NRestarts"))
    m.run("kill", "-KILL", str(old_main))
    poll("systemd to restart mi50d",
         lambda: active(m) == "active" and main_pid(m) not in (0, old_main), timeout=120)
    assert int(m.show("mi50d.service", "NRestarts")) == restarts + 1
    new_main = main_pid(m)
    # tiny is not autostart: every llama-server left is a child of the new daemon (none).
    for pid in server_pids(m):
        ppid = m.run("ps", "-o", "ppid=", "-p", str(pid), check=False).stdout.strip()
        assert ppid == str(new_main), f"orphan llama-server {pid} (parent {ppid})"
    start_tiny(m)
    m.run("systemctl", "stop", "mi50d.service", timeout=120)
    assert server_pids(m) == []


# ---------------------------------------------------------------------------------------------
# 7. Watchdog


def test_7_frozen_daemon_is_killed_by_the_watchdog(machine: Machine) -> None:
    m = machine
    dropin = "/etc/systemd/system/mi50d.service.d/60-e2e-watchdog.conf"
    m.write(dropin, "[Service]\nWatchdogSec=3s\n")
    m.run("systemctl", "daemon-reload")
    try:
        m.run("systemctl", "restart", "mi50d.service", timeout=120)
        frozen = main_pid(m)
        restarts = int(m.show("mi50d.service", "NRestarts"))
        m.run("kill", "-STOP", str(frozen))
        poll("the watchdog to replace the frozen daemon",
             lambda: active(m) == "active" and main_pid(m) not in (0, frozen), timeout=120)
        assert int(m.show("mi50d.service", "NRestarts")) == restarts + 1
        assert "Watchdog timeout" in m.journal("mi50d.service")
    finally:
        m.run("rm", "-f", dropin)
        m.run("systemctl", "daemon-reload")


def test_7_upgrade_keeps_instances_running(with_llama: Machine) -> None:
    m = with_llama
    tiny = start_tiny(m)
    reinstall(m)
    assert pid_on_port(m, TINY_PORT) == tiny
    assert healthy(m, TINY_PORT)


# ---------------------------------------------------------------------------------------------
# 8. Remove, then purge


def test_8_remove_keeps_config_and_purge_deletes_it(machine: Machine) -> None:
    m = machine
    m.write("/etc/mi50d/operator.toml", instance_toml(MODEL, 18090))
    m.run("rm", "-rf", "/etc/systemd/system/mi50d.service.d")
    m.run("systemctl", "daemon-reload")
    # Removal must stop the daemon whatever it is doing, even while it is still starting.
    m.run("systemctl", "start", "--no-block", "mi50d.service")
    poll("mi50d to be started", lambda: active(m) in ("activating", "active"))

    m.run("apt-get", "remove", "-y", "mi50d", timeout=300)
    for unit in ("mi50d.service", "mi50d.socket"):
        assert active(m, unit) == "inactive"
        load = m.show(unit, "LoadState")
        assert load == "not-found", f"{unit}: {load}"
    assert m.run("pgrep", "-f", "/opt/venvs/mi50d", check=False).stdout == ""
    assert server_pids(m) == []
    assert not m.exists("/usr/bin/mi50d") and not m.exists("/opt/venvs/mi50d")
    assert not m.exists(SOCKET)
    assert m.exists("/etc/mi50d/mi50d.toml")  # a conffile: kept until purge

    m.run("apt-get", "purge", "-y", "mi50d", timeout=300)
    assert not m.exists("/etc/mi50d/mi50d.toml")
    assert not m.exists("/var/lib/mi50d")
    # What the operator wrote stays; README documents this, and that the user stays.
    assert "operator.toml" in m.run("ls", "/etc/mi50d").stdout.split()
    assert m.run("id", "mi50d", check=False).returncode == 0
