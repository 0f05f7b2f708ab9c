"""mi50d.host.doctor and `mi50ctl doctor` / `mi50ctl check` on the recorded two-MI50 host, with real
files, modes, sockets and config directories."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mi50ctl.cli import cli
from mi50d.config import DaemonConfig
from mi50d.host.accounts import Account
from mi50d.host.checks import Check
from mi50d.host.doctor import host_checks, read_build, run_doctor, socket_check
from tests.ggufwriter import write_model
from tests.realbinary import llama_server

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
VIDEO_GID = 44


def host_tree(world: Path, tree: str = "two-mi50") -> dict[str, str]:
    dev = world / "dev"
    (dev / "dri").mkdir(parents=True, exist_ok=True)
    for node in (dev / "kfd", dev / "dri" / "renderD128", dev / "dri" / "renderD129"):
        node.touch()
        os.chown(node, 0, VIDEO_GID)
        node.chmod(0o660)
    rocm = world / "rocm"
    shutil.copytree(HOSTS / tree / "opt" / "rocm", rocm)
    return {"sysfs_root": str(HOSTS / tree / "sys"), "dev_root": str(dev), "rocm_path": str(rocm)}


def build(world: Path, backend: str, targets: list[str]) -> Path:
    """A build prefix laid out as mi50ctl build-llama makes it, with its build.json."""
    prefix = world / "llama" / f"20261125-{backend}"
    (prefix / "bin").mkdir(parents=True)
    binary = prefix / "bin" / "llama-server"
    binary.write_text("#!/bin/sh\necho 'version: 7000 (abc1234)'\n")
    binary.chmod(0o755)
    record = {"backend": backend, "targets": targets, "version": "version: 7000 (abc1234)\n"
              "built with cc for x86_64"}
    (prefix / "build.json").write_text(json.dumps(record))
    return binary


def nobody() -> Account:
    return Account("nobody", 65534, 65534, (65534, VIDEO_GID))


def named(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_host_checks_on_two_mi50(world: Path) -> None:
    daemon = DaemonConfig.model_validate({"llama_server": build(world, "hip", ["gfx906"]),
                                          "socket": world / "none.sock",
                                          "host": host_tree(world)})
    checks = named(host_checks(daemon, nobody()))
    assert checks["rocm"].message == f"ROCm 7.0.2 at {world / 'rocm'}"
    assert checks["gpus"].message == "2 GPU(s): gfx906"
    assert checks["gpu 0"].message == ("gfx906; 0000:03:00.0; VRAM 13.5 GiB / 16.0 GiB; "
                                       "edge 61 °C, junction 78 °C, mem 70 °C; 187 W; 97% busy")
    assert checks["device access"].status == "ok"
    assert checks["rocblas"].status == "ok"
    assert checks["rocminfo"].status == "skip"
    assert checks["hip tools"].status == "warn"
    assert checks["llama-server"].status == "ok"
    assert "hip build for gfx906; version: 7000 (abc1234)" in checks["llama-server"].message
    assert checks["daemon"].status == "warn"


def test_no_tensile_cpu_build_and_closed_devices(world: Path) -> None:
    daemon = DaemonConfig.model_validate({"llama_server": build(world, "cpu", []),
                                          "host": host_tree(world, "two-mi50-no-tensile")})
    checks = named(host_checks(daemon, Account("nobody", 65534, 65534, (65534,))))
    assert checks["rocblas"].status == "fail"
    assert checks["device access"].status == "fail"
    assert checks["llama-server"].status == "warn"
    assert checks["llama-server"].message.endswith("cpu build; version: 7000 (abc1234) (CPU only)")


def test_rocminfo_replaying_recorded_output(world: Path) -> None:
    host = host_tree(world)
    tool = Path(host["rocm_path"]) / "bin" / "rocminfo"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\ncat {HOSTS / 'two-mi50' / 'rocminfo.txt'}\n")
    tool.chmod(0o755)
    daemon = DaemonConfig.model_validate({"llama_server": build(world, "hip", ["gfx906"]),
                                          "host": host})
    assert named(host_checks(daemon, nobody()))["rocminfo"].message == "rocminfo agrees: gfx906"
    # what rocminfo prints when it cannot open /dev/kfd (recorded on a host without the group)
    tool.write_text("#!/bin/sh\necho 'ROCk module is loaded'\n"
                    "echo 'Unable to open /dev/kfd read-write: Permission denied'\nexit 1\n")
    check = named(host_checks(daemon, nobody()))["rocminfo"]
    assert check.status == "warn" and "reports no GPU but KFD has gfx906" in check.message


@pytest.mark.llama
def test_real_build_json_of_the_real_build() -> None:
    record = read_build(llama_server())
    assert record is not None and record["backend"] in ("cpu", "hip")


def test_socket_states(world: Path) -> None:
    path = world / "s.sock"
    assert socket_check(path).status == "warn"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        assert socket_check(path).status == "ok"
    stale = socket_check(path)  # the file stays after the listener is gone
    assert stale.status == "warn" and "does not accept connections" in stale.message


def config_dir(world: Path, instance: dict[str, object] | None = None) -> Path:
    cfg = world / "etc"
    cfg.mkdir()
    binary = build(world, "hip", ["gfx906"])
    host = host_tree(world)
    (cfg / "mi50d.toml").write_text(
        f'llama_server = "{binary}"\nuser = "nobody"\nsocket = "{world}/control.sock"\n'
        "[host]\n" + "".join(f'{k} = "{v}"\n' for k, v in host.items()))
    model = write_model(world / "m.gguf")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = {"model": str(model), "port": port, "n_gpu_layers": 0, **(instance or {})}
    (cfg / "tiny.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
    return cfg


def test_run_doctor_on_a_config_dir(world: Path) -> None:
    report = run_doctor(config_dir(world))
    assert not report.failed, [c.line() for c in report.all() if c.failed]
    assert named(report.host)["account"].message.startswith("instances run as nobody")
    assert [c.name for c in report.instances["tiny"]] == ["binary", "model", "port"]
    assert report.to_json()["ok"] is True


def test_cli_doctor_and_check(world: Path) -> None:
    cfg = config_dir(world, {"gpus": [0], "n_gpu_layers": "all", "ctx_size": 4 * 1024 * 1024})
    runner = CliRunner()
    done = runner.invoke(cli, ["doctor", "--config-dir", str(cfg)])
    assert done.exit_code == 1, done.output  # 4 GiB of KV on a GPU with 2.5 GiB free
    lines = done.output.splitlines()
    assert lines[0] == "Host"
    assert any(line.startswith("  ✓ rocm ") for line in lines)
    vram = next(line for line in lines if line.startswith("  ✗ vram"))
    assert "GPU 0 has 2.5 GiB free" in vram and "→ lower ctx_size" in vram
    done = runner.invoke(cli, ["check", "tiny", "--json", "--config-dir", str(cfg)])
    data = json.loads(done.output)
    assert done.exit_code == 1 and data["ok"] is False
    assert {c["name"]: c["status"] for c in data["checks"]}["vram"] == "fail"
    done = runner.invoke(cli, ["check", "nope", "--config-dir", str(cfg)])
    assert done.exit_code == 4 and "no instance 'nope'" in done.output and "tiny" in done.output


def test_cli_check_ok_exits_zero(world: Path) -> None:
    cfg = config_dir(world)
    done = CliRunner().invoke(cli, ["check", "tiny"], env={"MI50D_CONFIG_DIR": str(cfg)})
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[1].startswith("  ✓ binary")


def test_broken_config_is_one_failed_check(world: Path) -> None:
    cfg = world / "etc"
    cfg.mkdir()
    (cfg / "bad.toml").write_text('model = "/m.gguf"\nprot = 8080\n')
    report = run_doctor(cfg)
    assert report.failed and report.host[0].name == "config"
    assert "bad.toml" in report.host[0].message


def test_mi50ctl_does_not_import_the_checks_at_startup() -> None:
    code = "import sys, mi50ctl.cli; print(sorted(m for m in sys.modules if m.startswith('mi50d.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout
    for heavy in ("mi50d.host.doctor", "mi50d.host.preflight", "mi50d.host.ggufmeta", "mi50d.host.vram"):
        assert heavy not in loaded


def cpu_config_dir(world: Path, n_gpu_layers: object) -> Path:
    """The CPU demo host: no KFD, no ROCm, a cpu build, one instance."""
    cfg = world / "etc"
    cfg.mkdir()
    (world / "sys").mkdir()
    host = {"sysfs_root": world / "sys", "rocm_path": world / "no-rocm", "dev_root": world / "dev"}
    (cfg / "mi50d.toml").write_text(
        f'llama_server = "{build(world, "cpu", [])}"\nuser = "nobody"\n'
        f'socket = "{world}/control.sock"\n[host]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in host.items()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (cfg / "tiny.toml").write_text(f'model = "{write_model(world / "m.gguf")}"\nport = {port}\n'
                                   f"n_gpu_layers = {json.dumps(n_gpu_layers)}\n")
    return cfg


def test_doctor_on_the_cpu_demo_host_exits_zero(world: Path) -> None:
    cfg = cpu_config_dir(world, 0)
    report = run_doctor(cfg)
    assert not report.failed, [c.line() for c in report.all() if c.failed]
    checks = named(report.host)
    assert checks["rocm"].status == checks["gpus"].status == "skip"
    assert checks["rocm"].message.endswith("(not needed: every instance runs on the CPU)")
    done = CliRunner().invoke(cli, ["doctor", "--config-dir", str(cfg)])
    assert done.exit_code == 0, done.output


def test_doctor_fails_the_gpu_checks_when_an_instance_wants_a_gpu(world: Path) -> None:
    report = run_doctor(cpu_config_dir(world, "all"))
    assert report.failed
    assert named(report.host)["gpus"].status == "fail"


_SOCKET_AS_NOBODY = (
    "import sys; from pathlib import Path; from mi50d.host.doctor import socket_check; "
    "print(socket_check(Path(sys.argv[1]), 'llm').line())")


def test_a_socket_closed_to_the_user_names_the_configured_group(world: Path) -> None:
    path = world / "control.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        path.chmod(0o660)  # root's, group root: nobody may not connect
        done = subprocess.run([sys.executable, "-c", _SOCKET_AS_NOBODY, str(path)],
                              capture_output=True, text=True, check=False, user="nobody",
                              group=65534, extra_groups=[], cwd=Path(__file__).parent.parent,
                              timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"daemon: permission denied on {path}; fix: join the group "
                                   "llm: sudo usermod -aG llm $USER, then log in again")
