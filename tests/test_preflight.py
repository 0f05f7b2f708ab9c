"""mi50d.host.preflight with real files, permissions, mounts and the real llama-server; the GPU side
on the recorded two-MI50 trees with a device directory of real files and real modes."""

from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from mi50d.config import DaemonConfig, InstanceConfig
from mi50d.host.access import MAX_OUTPUT, check_access, run_as
from mi50d.host.accounts import Account
from mi50d.host.checks import Check
from mi50d.host.preflight import Other, parse_devices, run_preflight
from tests.ggufwriter import write_mmproj, write_model
from tests.realbinary import llama_server
from tests.realmounts import ntfs, tmpfs

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
VIDEO_GID = 44


def nobody(*groups: int) -> Account:
    pw = pwd.getpwnam("nobody")
    return Account(name="nobody", uid=pw.pw_uid, gid=pw.pw_gid, groups=(pw.pw_gid, *groups))


def script(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\necho 'version: 1 (test)'\n")
    path.chmod(mode)
    return path


def inst(model: Path, **keys: object) -> InstanceConfig:
    data: dict[str, object] = {"model": model, "port": free_port(), "n_gpu_layers": 0,
                               "name": "t", "source": model.parent / "t.toml"}
    return InstanceConfig.model_validate({**data, **keys})


def daemon(binary: Path, host: Mapping[str, object] | None = None) -> DaemonConfig:
    return DaemonConfig.model_validate({"llama_server": binary, "host": host or {}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_all_ok_for_a_cpu_instance_as_nobody(world: Path) -> None:
    model = write_model(world / "m.gguf")
    model.chmod(0o644)
    checks = run_preflight(inst(model), daemon(script(world / "llama-server")), nobody())
    assert [(c.name, c.status) for c in checks] == [
        ("binary", "ok"), ("model", "ok"), ("port", "ok")], [c.line() for c in checks]
    assert "version: 1 (test)" in checks[0].message


def test_binary_on_a_noexec_mount(world: Path) -> None:
    model = write_model(world / "m.gguf")
    with tmpfs(world / "ssd", "noexec") as point:
        binary = script(point / "llama-server")
        check = by_name(run_preflight(inst(model), daemon(binary), nobody()))["binary"]
    assert check.status == "fail" and check.message == f"{binary} is on a noexec mount"
    assert check.fix is not None and f"mount -o remount,exec {point}" in check.fix


def test_binary_not_executable_by_the_account(world: Path) -> None:
    binary = script(world / "llama-server", 0o700)
    check = by_name(run_preflight(inst(write_model(world / "m.gguf")), daemon(binary),
                                  nobody()))["binary"]
    assert check.status == "fail"
    assert check.message == f"nobody cannot execute {binary}: Permission denied"
    # the daemon itself (root) could: the check really ran as nobody
    assert by_name(run_preflight(inst(world / "m.gguf"), daemon(binary), None))[
        "binary"].status == "ok"


def test_model_of_another_uid_mode_0600_is_unreadable_for_nobody(world: Path) -> None:
    model = write_model(world / "m.gguf")
    os.chown(model, 1234, 1234)
    model.chmod(0o600)
    check = by_name(run_preflight(inst(model), daemon(script(world / "s")), nobody()))["model"]
    assert check.status == "fail"
    assert check.message == f"nobody cannot read {model}: Permission denied"
    assert check.fix is not None and "chmod g+r" in check.fix
    model.chmod(0o604)
    ok = by_name(run_preflight(inst(model), daemon(script(world / "s")), nobody()))["model"]
    assert ok.status == "ok", ok.line()


def test_model_on_ntfs_with_a_root_only_umask(world: Path) -> None:
    source = write_model(world / "m.gguf")
    with ntfs(world / "ssd", world / "ntfs.img", "uid=0,gid=0,umask=077") as point:
        model = point / "m.gguf"
        shutil.copyfile(source, model)
        check = by_name(run_preflight(inst(model), daemon(script(world / "s")), nobody()))[
            "model"]
        assert check.status == "fail" and "Permission denied" in check.message
        assert check.fix is not None
        assert check.fix.startswith(f"{point} is fuseblk")
        assert "uid 0 gid 0 mode 700" in check.fix and "uid=65534,gid=65534,umask=022" in check.fix


def test_truncated_missing_and_swapped_files(world: Path) -> None:
    binary = daemon(script(world / "s"))
    full = write_model(world / "m.gguf")
    cut = world / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:-1000])
    check = by_name(run_preflight(inst(cut), binary, nobody()))["model"]
    assert check.status == "fail" and "truncated" in check.message and "missing" in check.message
    gone = by_name(run_preflight(inst(world / "gone.gguf"), binary, nobody()))["model"]
    assert gone.status == "fail" and gone.fix is not None and "requires_mounts" in gone.fix
    mmproj = write_mmproj(world / "mmproj-F16.gguf")
    swapped = by_name(run_preflight(inst(mmproj, mmproj=full), binary, nobody()))
    assert swapped["model"].message == f"{mmproj} is an mmproj (vision projector), not a model"
    assert swapped["mmproj"].message == f"{full} is a model (llama), not an mmproj"
    right = by_name(run_preflight(inst(full, mmproj=mmproj), binary, nobody()))
    assert right["model"].status == right["mmproj"].status == "ok"


def test_port_taken_by_a_process_or_another_instance(world: Path) -> None:
    model, binary = write_model(world / "m.gguf"), daemon(script(world / "s"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        check = by_name(run_preflight(inst(model, port=port), binary, nobody()))["port"]
    assert check.status == "fail"
    assert check.message == f"port {port} on 127.0.0.1 is in use by another process"
    other = Other("gpt-oss-20b", "127.0.0.1", port, running=True)
    check = by_name(run_preflight(inst(model, port=port), binary, nobody(), [other]))["port"]
    assert check.message == f"port {port} belongs to instance gpt-oss-20b (running)"
    low = by_name(run_preflight(inst(model, port=80), binary, nobody()))["port"]
    assert low.status == "fail" and "only root" in low.message


def test_requires_mounts(world: Path) -> None:
    model, binary = write_model(world / "m.gguf"), daemon(script(world / "s"))
    with tmpfs(world / "ssd", "exec") as point:
        check = by_name(run_preflight(inst(model, requires_mounts=[point]), binary,
                                      nobody()))[f"mount {point}"]
        assert check.status == "ok"
    (world / "late").mkdir()
    late = by_name(run_preflight(inst(model, requires_mounts=[world / "late"]), binary,
                                 nobody(), bus_address=f"unix:path={world}/no-bus"))
    assert late[f"mount {world / 'late'}"].status == "fail"


# --- GPUs: recorded sysfs trees, real device files with real modes -----------------------------

def gpu_host(world: Path, tree: str = "two-mi50", dev_mode: int = 0o660) -> dict[str, object]:
    dev = world / "dev"
    (dev / "dri").mkdir(parents=True, exist_ok=True)
    for node in (dev / "kfd", dev / "dri" / "renderD128", dev / "dri" / "renderD129"):
        node.touch()
        os.chown(node, 0, VIDEO_GID)
        node.chmod(dev_mode)
    return {"sysfs_root": HOSTS / tree / "sys", "dev_root": dev,
            "rocm_path": HOSTS / tree / "opt" / "rocm"}


def test_gpu_checks_pass_with_the_video_group(world: Path) -> None:
    model = write_model(world / "m.gguf")
    cfg = daemon(script(world / "s"), gpu_host(world))
    checks = by_name(run_preflight(inst(model, n_gpu_layers="all", gpus=[1]), cfg,
                                   nobody(VIDEO_GID), run_binary=False))
    assert checks["gpus"].message == "GPU 1 gfx906"
    assert checks["device access"].status == "ok"
    assert checks["rocblas"].status == "ok"
    assert checks["vram"].status == "ok", checks["vram"].line()


def test_device_nodes_closed_to_the_account(world: Path) -> None:
    cfg = daemon(script(world / "s"), gpu_host(world))
    check = by_name(run_preflight(inst(write_model(world / "m.gguf"), n_gpu_layers=None), cfg,
                                  nobody(), run_binary=False))["device access"]
    assert check.status == "fail"
    assert check.message.startswith(f"nobody cannot open {world}/dev/kfd (Permission denied")
    assert check.fix is not None and "usermod -aG render,video nobody" in check.fix


def test_missing_tensile_files_and_unknown_gpu_index(world: Path) -> None:
    model = write_model(world / "m.gguf")
    cfg = daemon(script(world / "s"), gpu_host(world, "two-mi50-no-tensile"))
    checks = by_name(run_preflight(inst(model, n_gpu_layers=None), cfg, nobody(VIDEO_GID),
                                   run_binary=False))
    assert checks["rocblas"].status == "fail"
    assert "ROCm 7.0.2 has no gfx906 Tensile files (ROCm >= 6.4 ships none)" in checks[
        "rocblas"].message
    assert "TensileLibrary.dat" in checks["rocblas"].message
    bad = by_name(run_preflight(inst(model, n_gpu_layers=None, gpus=[2]), cfg, nobody(VIDEO_GID),
                                run_binary=False))["gpus"]
    assert bad.message == "gpus = [2] but this host has GPUs 0-1"


def test_vram_refused_on_the_busy_16_gb_gpu(world: Path) -> None:
    # 2 layers * 2 kv heads * (64 + 64) * 2 bytes = 1 KiB per token: 4M tokens need 4 GiB of KV,
    # and the f16 KQ mask (512 * 4M * 2 bytes) 4 GiB more, plus 708 MiB of overhead (vram v2)
    model = write_model(world / "m.gguf")
    cfg = daemon(script(world / "s"), gpu_host(world))
    big = inst(model, n_gpu_layers=None, gpus=[0], ctx_size=4 * 1024 * 1024)
    other = Other("gpt-oss-20b", "127.0.0.1", 1, running=True, vram={0: 13 << 30})
    check = by_name(run_preflight(big, cfg, nobody(VIDEO_GID), [other], run_binary=False))["vram"]
    assert check.status == "fail"
    assert check.message.startswith("needs ~8.7 GiB")
    assert check.message.endswith("GPU 0 has 2.5 GiB free; gpt-oss-20b holds 13.0 GiB")
    forced = inst(model, n_gpu_layers=None, gpus=[0], ctx_size=4 * 1024 * 1024, force_vram=True)
    check = by_name(run_preflight(forced, cfg, nobody(VIDEO_GID), [other], run_binary=False))[
        "vram"]
    assert check.status == "warn"
    roomy = inst(model, n_gpu_layers=None, gpus=[1], ctx_size=4 * 1024 * 1024)
    assert by_name(run_preflight(roomy, cfg, nobody(VIDEO_GID), [other], run_binary=False))[
        "vram"].status == "ok"


def test_no_kfd_means_no_gpu(world: Path) -> None:
    cfg = daemon(script(world / "s"), {"sysfs_root": world})
    check = by_name(run_preflight(inst(write_model(world / "m.gguf"), n_gpu_layers=None), cfg,
                                  nobody(), run_binary=False))["gpus"]
    assert check.status == "fail" and "n_gpu_layers = 0" in (check.fix or "")


# --- the real llama-server ---------------------------------------------------------------------

@pytest.mark.llama
def test_real_binary_runs_and_its_cpu_build_lists_no_gpu(world: Path) -> None:
    real = llama_server()
    model = write_model(world / "m.gguf")
    cpu = by_name(run_preflight(inst(model), daemon(real), None))
    assert cpu["binary"].status == "ok" and "version:" in cpu["binary"].message
    gpu = by_name(run_preflight(inst(model, n_gpu_layers=None), daemon(real), None))
    assert gpu["devices"].status == "fail"
    assert "sees no GPU" in gpu["devices"].message


def test_parse_list_devices() -> None:
    out = ("Available devices:\n"
           "  ROCm0: AMD Instinct MI50/MI60 (16368 MiB, 16348 MiB free)\n"
           "  ROCm1: AMD Instinct MI50/MI60 (32752 MiB, 32732 MiB free)\n")
    devices = parse_devices(out)
    assert [d["name"] for d in devices] == ["ROCm0", "ROCm1"]
    assert devices[1]["total_mib"] == 32752
    assert parse_devices("Available devices:\n  (none)\n") == []


# --- paths that are not regular files, and lookups that fail ------------------------------------

@pytest.mark.parametrize("account", [nobody(), None], ids=["as-nobody", "as-daemon"])
def test_a_fifo_as_the_model_fails_at_once_without_blocking(world: Path,
                                                           account: Account | None) -> None:
    fifo = world / "m.gguf"
    os.mkfifo(fifo)  # no writer: a blocking open for reading would wait forever
    fifo.chmod(0o644)
    check = by_name(run_preflight(inst(fifo), daemon(script(world / "s")), account))["model"]
    assert check.status == "fail"
    assert check.message == f"{fifo} is not a regular file (a FIFO (named pipe))"
    assert check.fix == "point model at the .gguf file itself; a FIFO (named pipe) cannot be loaded"


def test_directory_loop_and_dangling_link_each_get_their_own_fix(world: Path) -> None:
    binary = daemon(script(world / "s"))
    (world / "models").mkdir()
    check = by_name(run_preflight(inst(world / "models"), binary, nobody()))["model"]
    assert (check.message, check.fix) == (f"{world}/models is a directory, not a file",
                                          "point model at the .gguf file in it")
    loop = world / "loop.gguf"
    loop.symlink_to(world / "loop2.gguf")
    (world / "loop2.gguf").symlink_to(loop)
    check = by_name(run_preflight(inst(loop), binary, nobody()))["model"]
    assert check.message == f"{loop} is a symlink loop (links that lead back to themselves)"
    dangling = world / "gone.gguf"
    dangling.symlink_to("/nowhere/m.gguf")
    check = by_name(run_preflight(inst(dangling), binary, nobody()))["model"]
    assert check.message == f"{dangling} is a symlink to /nowhere/m.gguf, which does not exist"
    for fixed in (by_name(run_preflight(inst(p), binary, nobody()))["model"].fix
                  for p in (world / "models", loop, dangling)):
        assert fixed is not None and "chmod" not in fixed
    bin_dir = daemon(world / "models")
    check = by_name(run_preflight(inst(loop), bin_dir, nobody()))["binary"]
    assert check.fix == "point llama_server at the llama-server executable in it"


_AS_NOBODY = r"""
import json, sys
from pathlib import Path
from mi50d.config import DaemonConfig, InstanceConfig
from mi50d.host.preflight import run_preflight
model, binary = Path(sys.argv[1]), Path(sys.argv[2])
inst = InstanceConfig.model_validate({"model": model, "port": 1, "n_gpu_layers": 0,
                                      "name": "t", "source": "/t.toml"})
checks = run_preflight(inst, DaemonConfig(llama_server=binary), None, run_binary=False)
print(json.dumps({c.name: [c.status, c.message, c.fix] for c in checks}))
"""


def test_a_directory_the_daemon_cannot_search_is_a_failed_check_not_an_exception(
        world: Path) -> None:
    # an unprivileged daemon (here: a real process running as nobody) checks as itself
    locked = world / "locked"
    locked.mkdir(mode=0o700)
    model = write_model(locked / "m.gguf")
    done = subprocess.run([sys.executable, "-c", _AS_NOBODY, str(model),
                           str(script(world / "llama-server"))], capture_output=True, text=True,
                          check=False, user="nobody", group=65534, extra_groups=[],
                          cwd=Path(__file__).parent.parent, timeout=120)
    assert done.returncode == 0, done.stderr
    status, message, fix = json.loads(done.stdout)["model"]
    assert status == "fail"
    assert message == f"nobody cannot look up {model}: a directory above it is not searchable"
    assert fix == (f"give nobody search (x) permission on each directory above it; "
                   f"namei -l {model} shows which")


def test_a_corrupt_block_count_on_a_gpu_host_is_a_failed_vram_check(world: Path) -> None:
    model = write_model(world / "m.gguf", block_count=1 << 40)
    cfg = daemon(script(world / "s"), gpu_host(world))
    check = by_name(run_preflight(inst(model, n_gpu_layers="all", gpus=[1]), cfg,
                                  nobody(VIDEO_GID), run_binary=False))["vram"]
    assert check.status == "fail"
    assert check.message == (f"{model}: llama.block_count = 1099511627776, but llama.cpp "
                             "allows 0 to 512 layers: corrupt")


# --- children run for checks: bounded in time and output ----------------------------------------

def test_a_grandchild_holding_the_output_open_does_not_hold_the_check(world: Path) -> None:
    pidfile = world / "sleeper.pid"
    result = run_as(None, ["/bin/sh", "-c", f"sleep 600 & echo $! > {pidfile}; echo 'version: 1'"],
                    {"PATH": "/usr/bin:/bin"}, 300)
    assert result.ok and result.output == "version: 1\n"
    sleeper = int(pidfile.read_text())
    try:
        exited = os.pidfd_open(sleeper)
    except ProcessLookupError:
        return  # killed with the check's process group, and already reaped
    try:  # SIGKILL was sent to the group: the sleeper ends (well before its 600 s)
        assert select.select([exited], [], [], 60)[0] == [exited]
    finally:
        os.close(exited)


def test_a_child_that_prints_forever_is_kept_to_max_output(world: Path) -> None:
    result = run_as(None, [sys.executable, "-c", "import sys\nfor _ in range(4000): "
                           "sys.stdout.write('x' * 4096 + '\\n')"], {}, 300)
    assert result.ok
    assert len(result.output) < MAX_OUTPUT + 100
    assert "bytes left out" in result.output


def test_a_check_that_cannot_finish_does_not_quote_its_script(world: Path) -> None:
    (problem,) = check_access(nobody(), [(world, "r")], timeout_s=0.001)
    assert problem == "cannot check as nobody: did not finish within 0 s"


# --- the projector's width against the model's (the guide's 32B server with the 8B mmproj) -----

def test_qwen3vl_projector_width_counts_its_deepstack_layers(world: Path) -> None:
    # Qwen3-VL: the merger's output (mm.2.bias) is sent once plus once per deepstack layer, and
    # the text model takes embedding_length * (1 + n_deepstack_layers); here 256 * 4 on both sides
    binary = daemon(script(world / "s"))
    model = write_model(world / "vl.gguf", arch="qwen3vl", n_embd=256, deepstack=3)
    mmproj = write_mmproj(world / "mmproj-vl.gguf", n_embd=256, deepstack=3)
    check = by_name(run_preflight(inst(model, mmproj=mmproj), binary, nobody()))["projector"]
    assert check.status == "ok", check.line()
    assert check.message == "qwen3vl_merger projector makes 1024-wide embeddings, as vl.gguf takes"


def test_a_projector_of_another_model_size_is_refused(world: Path) -> None:
    # the guide's mistake, scaled down: the "32B" model is 320 wide, its mmproj is the "8B" one
    binary = daemon(script(world / "s"))
    big = write_model(world / "32b.gguf", arch="qwen3vl", n_embd=320, n_head=4, n_head_kv=2,
                      deepstack=3)
    small = write_mmproj(world / "mmproj-8b.gguf", n_embd=256, deepstack=3)
    check = by_name(run_preflight(inst(big, mmproj=small), binary, nobody()))["projector"]
    assert check.status == "fail"
    assert check.message == (
        "mmproj-8b.gguf makes 1024 (width 256 x (1 + 3 deepstack))-wide embeddings, but 32b.gguf "
        "(qwen3vl) takes 1280 (embedding_length 320 x (1 + 3 deepstack)): llama-server would "
        "refuse it (\"mismatch between text model and mmproj\"); a projector of another model "
        "size?")
    assert check.fix is not None and "projector published with this model" in check.fix
    # deepstack counts that differ are a mismatch too, though the base widths agree
    other = write_mmproj(world / "mmproj-2.gguf", n_embd=320, deepstack=2)
    assert by_name(run_preflight(inst(big, mmproj=other), binary, nobody()))[
        "projector"].status == "fail"


def test_projector_types_whose_width_mi50d_cannot_compute_are_skipped(world: Path) -> None:
    binary = daemon(script(world / "s"))
    model = write_model(world / "m.gguf", n_embd=320, n_head=4, n_head_kv=2)
    mmproj = write_mmproj(world / "mmproj-g.gguf", n_embd=256, projector="gemma3")
    check = by_name(run_preflight(inst(model, mmproj=mmproj), binary, nobody()))["projector"]
    assert check.status == "skip" and check.message == "gemma3 projector: width not checked"
    qwen25 = write_mmproj(world / "mmproj-25.gguf", n_embd=256, deepstack=2,
                          projector="qwen2.5vl_merger")  # deepstack is qwen3vl's alone
    check = by_name(run_preflight(inst(model, mmproj=qwen25), binary, nobody()))["projector"]
    assert check.status == "fail" and "makes 256-wide" in check.message


@pytest.mark.llama
@pytest.mark.parametrize("deepstack", [0, 1])
def test_the_real_llama_server_agrees_with_the_projector_check(
        world: Path, tiny_model: Path, deepstack: int) -> None:
    # The tiny model is 64 wide. A projector with a 64-long mm.2.bias fits; with one deepstack
    # layer it makes 64 * 2 and llama-server refuses it, as the check says before any start.
    real = llama_server()
    mmproj = write_mmproj(world / "mmproj.gguf", n_embd=64, deepstack=deepstack)
    check = by_name(run_preflight(inst(tiny_model, mmproj=mmproj), daemon(real), None,
                                  run_binary=False))["projector"]
    argv = [str(real), "-m", str(tiny_model), "--mmproj", str(mmproj), "--no-warmup",
            "-c", "256", "--port", str(free_port())]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL) as server:
        assert server.stdout is not None
        try:  # read until it listens or exits (pytest-timeout bounds a server that does neither)
            lines = []
            for line in server.stdout:
                lines.append(line)
                if "listening on" in line:
                    break
        finally:
            server.kill()
    refused = [line for line in lines if "mismatch between text model" in line]
    if deepstack:
        assert check.status == "fail" and "makes 128 (width 64 x (1 + 1 deepstack))" in check.message
        assert refused and "(n_embd = 64) and mmproj (n_embd = 128)" in refused[0], lines[-5:]
    else:
        assert check.status == "ok", check.line()
        assert not refused and "listening on" in lines[-1], lines[-5:]


def test_only_qwen3vl_models_read_their_deepstack_count(world: Path) -> None:
    # llama.cpp's llama architecture ignores an n_deepstack_layers key: its input stays 256 wide
    binary = daemon(script(world / "s"))
    model = write_model(world / "m.gguf", n_embd=256, deepstack=3)
    mmproj = write_mmproj(world / "mmproj.gguf", n_embd=256)
    assert by_name(run_preflight(inst(model, mmproj=mmproj), binary, nobody()))[
        "projector"].status == "ok"


def test_api_key_file_is_checked_like_the_model(world: Path) -> None:
    binary, model = daemon(script(world / "s")), write_model(world / "m.gguf")
    keys = world / "keys"
    os.mkfifo(keys)
    check = by_name(run_preflight(inst(model, api_key_file=keys), binary, nobody()))[
        "api key file"]
    assert check.status == "fail" and check.message == f"{keys} is not a regular file (a FIFO (named pipe))"
    keys.unlink()
    keys.write_text("sk-local\n")
    keys.chmod(0o600)
    check = by_name(run_preflight(inst(model, api_key_file=keys), binary, nobody()))[
        "api key file"]
    assert check.status == "fail" and check.message == f"nobody cannot read {keys}: Permission denied"
    keys.chmod(0o644)
    assert by_name(run_preflight(inst(model, api_key_file=keys), binary, nobody()))[
        "api key file"].status == "ok"
