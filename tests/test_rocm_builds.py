"""A HIP build on a host with no usable GPU is told apart from a CPU build (preflight's fix is the
host's, not a rebuild), and a running instance that fell back to the CPU shows "degraded" in
`mi50ctl status` and `start`.

The HIP build's output with no device is RECORDED from the real Debian ROCm 7.2.4 build of
llama.cpp for gfx906 (../shared/research/hip-build-debian.md §3); the no-GPU host and the CPU
build are real."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from mi50ctl import render
from mi50d.config import DaemonConfig, InstanceConfig
from mi50d.control.protocol import InstanceStatus
from mi50d.host import rocm
from mi50d.host.checks import Check
from mi50d.host.hooks import degraded_reason
from mi50d.host.preflight import run_preflight
from tests.ctlsupport import running_daemon, server_instance
from tests.ggufwriter import write_model
from tests.realbinary import llama_server

# recorded: the real HIP build's `--list-devices` on a host without a GPU (rc 0)
HIP_NO_DEVICE = ("0.00.003.854 E ggml_cuda_init: failed to initialize ROCm: no ROCm-capable "
                 "device is detected")
HIP_LIST_DEVICES = f"{HIP_NO_DEVICE}\nAvailable devices:\n  (none)\n"


def binary(world: Path, list_devices: str, backend: str | None = None) -> Path:
    """A llama-server stand-in answering --version and --list-devices with recorded text, laid
    out as build-llama's prefix (bin/ and build.json) when `backend` is given."""
    prefix = world / "build"
    (prefix / "bin").mkdir(parents=True)
    path = prefix / "bin" / "llama-server"
    path.write_text("#!/bin/sh\nif [ \"$1\" = --list-devices ]; then\ncat <<'EOF'\n"
                    f"{list_devices}EOF\nelse echo 'version: 0.6.0-dev (build 0, commit unknown)'"
                    "\nfi\n")
    path.chmod(0o755)
    if backend is not None:
        (prefix / "build.json").write_text(json.dumps({"backend": backend, "targets": []}))
    return path


def devices_check(world: Path, server: Path) -> Check:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inst = InstanceConfig.model_validate({
        "model": write_model(world / "m.gguf"), "port": port, "n_gpu_layers": "all",
        "name": "t", "source": world / "t.toml"})
    cfg = DaemonConfig.model_validate({"llama_server": server, "host": {"sysfs_root": world}})
    checks = {c.name: c for c in run_preflight(inst, cfg, None)}
    return checks["devices"]


def test_hip_build_without_a_device_is_the_hosts_problem(world: Path) -> None:
    server = binary(world, HIP_LIST_DEVICES)
    check = devices_check(world, server)
    assert check.status == "fail"
    assert check.message == (f"{server} is a HIP build but sees no GPU (no ROCm-capable device "
                             "is detected): it would run on the CPU")
    assert check.fix is not None and "mi50ctl doctor" in check.fix
    assert "build-llama" not in check.fix
    assert check.data["backend"] == "hip"


def test_hip_build_json_says_hip_even_without_the_rocm_line(world: Path) -> None:
    server = binary(world, "Available devices:\n  (none)\n", backend="hip")
    check = devices_check(world, server)
    assert check.message.startswith(f"{server} is a HIP build but sees no GPU (no ROCm device "
                                    "visible)")


def test_cpu_build_is_told_to_rebuild_with_hip(world: Path) -> None:
    server = binary(world, "Available devices:\n  (none)\n", backend="cpu")
    check = devices_check(world, server)
    assert check.message == f"{server} sees no GPU (a cpu build, without HIP): it would run on the CPU"
    assert check.fix is not None and check.fix.startswith("build with HIP: mi50ctl build-llama")


def test_build_backend_sources(world: Path) -> None:
    lone = world / "lone" / "llama-server"
    lone.parent.mkdir()
    lone.touch()
    assert rocm.build_backend(lone, "") is None
    assert rocm.build_backend(lone, HIP_LIST_DEVICES) == "hip"
    (lone.parent / "libggml-hip.so").touch()  # build trees keep the backend library beside it
    assert rocm.build_backend(lone, "") == "hip"
    assert rocm.rocm_init_failure(HIP_LIST_DEVICES) == "no ROCm-capable device is detected"
    assert rocm.rocm_init_failure("Available devices:\n  (none)\n") is None


@pytest.mark.llama
def test_real_cpu_build_is_not_called_a_hip_build(world: Path) -> None:
    check = devices_check(world, llama_server())
    assert check.status == "fail" and "sees no GPU" in check.message
    assert "HIP build" not in check.message
    assert check.fix is not None and check.fix.startswith("build with HIP")


def status(state: str, diagnosis: str | None) -> InstanceStatus:
    return InstanceStatus(name="tiny", state=state, reason="/health answered 200", host="127.0.0.1",
                          port=8090, endpoint="http://127.0.0.1:8090", autostart=False, since=0.0,
                          diagnosis=diagnosis)


def test_degraded_shows_in_the_table_and_in_start() -> None:
    inst = InstanceConfig.model_validate({"model": "/m.gguf", "port": 8090, "name": "tiny",
                                          "source": "/tiny.toml"})
    reason = degraded_reason(inst)([HIP_NO_DEVICE, "I srv  llama_server: model loaded"])
    assert reason is not None and reason.startswith("degraded: ")
    table = render.status_table([status("running", reason)])
    assert table.splitlines()[1].endswith(reason)
    started = render.started_text(status("running", reason), 1.0).splitlines()
    assert started == [f"tiny {reason}", "tiny running: http://127.0.0.1:8090 (ready in 1s)"]
    healthy = status("running", None)
    assert render.started_text(healthy, 1.0) == "tiny running: http://127.0.0.1:8090 (ready in 1s)"
    assert render.status_table([healthy]).splitlines()[1].endswith("all")  # GPUS, no reason


@pytest.mark.llama
def test_degraded_end_to_end(request: pytest.FixtureRequest, world: Path) -> None:
    """The real llama-server behind a wrapper that first prints the recorded HIP line, as the
    real HIP build does before it serves from the CPU."""
    wrapper = world / "hip-llama-server"
    wrapper.write_text(f"#!/bin/sh\necho '{HIP_NO_DEVICE}' >&2\nexec {llama_server()} \"$@\"\n")
    wrapper.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    table = server_instance(request, port, llama_server=str(wrapper))
    with running_daemon({}, {"tiny": table}) as d:
        started = d.ctl("start", "tiny")
        assert started.returncode == 0, started.stderr
        out = started.stdout.splitlines()
        assert out[-2].startswith("tiny degraded: no ROCm device visible"), out
        assert out[-1].startswith(f"tiny running: http://127.0.0.1:{port}")
        shown = d.ctl("status", "tiny")
        row = shown.stdout.splitlines()[1]
        assert row.split()[1] == "running" and "degraded: no ROCm device visible" in row


def test_doctor_names_a_hip_build_without_a_device(world: Path) -> None:
    from mi50d.host.doctor import host_checks

    server = binary(world, HIP_LIST_DEVICES)  # no build.json: doctor runs it
    cfg = DaemonConfig.model_validate({"llama_server": server, "socket": world / "none.sock",
                                       "host": {"sysfs_root": world, "rocm_path": world}})
    check = {c.name: c for c in host_checks(cfg, None)}["llama-server"]
    assert check.message.endswith("a HIP build that sees no GPU (no ROCm-capable device is "
                                  "detected)")
