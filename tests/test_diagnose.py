"""mi50d.host.diagnose against what the real llama-server prints (port taken, missing, corrupt and
truncated models) and against recorded ROCm output for the GPU-only failures."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mi50d.host.diagnose import MAX_SCAN, SIGNATURES, degraded, diagnose, diagnose_line
from tests.ggufwriter import write_model
from tests.realbinary import llama_server


def run_llama(*args: str) -> list[str]:
    done = subprocess.run([str(llama_server()), *args], capture_output=True, text=True,
                          timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode != 0, "llama-server was expected to fail"
    return (done.stdout + done.stderr).splitlines()


def codes(lines: list[str]) -> list[str]:
    return [d.code for d in diagnose(lines)]


@pytest.mark.llama
def test_real_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lines = run_llama("-m", "/nonexistent/model.gguf", "--host", "127.0.0.1",
                          "--port", str(port))
    (d,) = diagnose(lines)
    assert d.code == "port_in_use"
    assert d.message == f"port {port} on 127.0.0.1 is already taken"
    assert not d.degraded


@pytest.mark.llama
def test_real_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "gone.gguf"
    lines = run_llama("-m", str(missing), "--port", "0")
    (d,) = diagnose(lines)
    assert d.code == "model_open_failed"
    assert d.message == f"cannot open the model {missing}: No such file or directory"


@pytest.mark.llama
def test_real_corrupt_and_truncated_models(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00junk")
    assert codes(run_llama("-m", str(bad), "--port", "0")) == ["model_invalid"]
    html = tmp_path / "page.gguf"
    html.write_bytes(b"<!DOCTYPE html><html>" + b" " * 64)
    assert codes(run_llama("-m", str(html), "--port", "0")) == ["model_invalid"]
    full = write_model(tmp_path / "m.gguf")
    cut = tmp_path / "cut.gguf"
    shutil.copyfile(full, cut)
    with cut.open("r+b") as f:
        f.truncate(full.stat().st_size - 1000)
    (d,) = diagnose(run_llama("-m", str(cut), "--port", "0"))
    assert d.code == "model_truncated" and "output.weight" in d.message


@pytest.mark.llama
def test_real_model_llama_cannot_use_names_the_reason(tmp_path: Path) -> None:
    # our test GGUF lacks keys a real llama model has; llama.cpp says which
    (d,) = diagnose(run_llama("-m", str(write_model(tmp_path / "m.gguf")), "--port", "0"))
    assert d.code == "model_invalid"
    assert "key not found in model" in d.message


# Recorded output of ROCm builds and the ROCm runtime (no GPU here to produce it).
RECORDED = {
    "tensile_missing": [
        "rocBLAS error: Cannot read /opt/rocm-7.0.2/lib/llvm/bin/../../../lib/rocblas/library/"
        "TensileLibrary.dat: Illegal seek for GPU arch : gfx906",
        " List of available TensileLibrary Files : ",
        "\"/opt/rocm-7.0.2/lib/llvm/bin/../../../lib/rocblas/library/"
        "TensileLibrary_lazy_gfx942.dat\"",
    ],
    "out_of_memory": [
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 15360.00 MiB on device 0: "
        "cudaMalloc failed: out of memory",
        "alloc_tensor_range: failed to allocate ROCm0 buffer of size 16106127360",
        "llama_model_load: error loading model: unable to allocate ROCm0 buffer",
        "llama_model_load_from_file_impl: failed to load model",
    ],
    "invalid_device_function": [
        "ROCm error: invalid device function",
        "  current device: 0, in function ggml_cuda_compute_forward at "
        "ggml/src/ggml-cuda/ggml-cuda.cu:2551",
        "  err",
    ],
    "no_rocm_device": [
        "ggml_cuda_init: failed to initialize ROCm: no ROCm-capable device is detected",
        "warning: no usable GPU found, --gpu-layers option will be ignored",
    ],
    "gpu_hang": [
        "HW Exception by GPU node-1 (Agent handle: 0x5607a2a6f4c0) reason :GPU Hang",
    ],
    "hsa_error": [
        ":0:rocdevice.cpp            :3018: 2417188873 us: Callback: Queue 0x7f2c3c200000 "
        "aborting with error : HSA_STATUS_ERROR_MEMORY_APERTURE_VIOLATION: The agent attempted "
        "to access memory beyond the largest legal address. code: 0x29",
    ],
    "kfd_access": [
        "Unable to open /dev/kfd read-write: Permission denied",
    ],
    "shared_library": [
        "/var/lib/mi50d/llama/current/bin/llama-server: error while loading shared libraries: "
        "libhipblas.so.3: cannot open shared object file: No such file or directory",
    ],
    # mtmd.cpp's message (its format string) for the guide's 32B model with the 8B projector:
    # 4096 x (1 + 3 deepstack) against 5120 x (1 + 3)
    "mmproj_mismatch": [
        "mtmd_init_from_file: error: mismatch between text model (n_embd = 20480) and mmproj "
        "(n_embd = 16384)",
        "hint: you may be using wrong mmproj",
    ],
    "cpu_only": [
        "load_tensors: offloaded 0/25 layers to GPU",
        "load_tensors:   CPU_Mapped model buffer size = 11536.18 MiB",
    ],
}


@pytest.mark.parametrize("code", sorted(RECORDED))
def test_recorded_gpu_failures(code: str) -> None:
    found = diagnose(RECORDED[code])
    assert [d.code for d in found] == [code]
    assert found[0].fix


def test_every_signature_has_a_recorded_or_real_case() -> None:
    tested_for_real = {"port_in_use", "model_open_failed", "model_invalid", "model_truncated",
                       "rpc_unreachable", "rpc_worker_lost"}  # the last two: test_rpc_workers
    untested = {s.code for s in SIGNATURES} - set(RECORDED) - tested_for_real
    assert untested == {"unknown_architecture"}
    line = ("llama_model_load: error loading model: error loading model architecture: "
            "unknown model architecture: 'qwen9'")
    d = diagnose_line(line)
    assert d is not None and d.code == "unknown_architecture" and "'qwen9'" in d.message


def test_cpu_fallback_is_degraded_only_for_instances_that_asked_for_gpus() -> None:
    lines = RECORDED["no_rocm_device"] + RECORDED["cpu_only"]
    assert degraded(lines, expects_gpu=True)
    assert not degraded(lines, expects_gpu=False)
    assert not degraded(RECORDED["out_of_memory"])
    assert [d.code for d in diagnose(lines)] == ["no_rocm_device", "cpu_only"]
    assert diagnose(lines, expects_gpu=False) == []


def test_healthy_rocm_load_has_no_diagnosis() -> None:
    lines = [
        "ggml_cuda_init: found 2 ROCm devices (Total VRAM: 49120 MiB):",
        "  Device 0: AMD Instinct MI50/MI60, gfx906:sramecc+:xnack- (0x906), VMM: no, "
        "Wave Size: 64, VRAM: 16368 MiB",
        "load_tensors: offloaded 25/25 layers to GPU",
        "srv  llama_server: model loaded",
    ]
    assert diagnose(lines) == []


# One line of output can be megabytes (a prompt echoed in a log line). Every pattern run on
# output must be linear in the line's length: the old buffer-size pattern took 10.6 s on 64 KiB of
# letters (quadratic: a 1 MiB line would take about 45 minutes). The child below runs every
# pattern, uncapped, and the capped entry points on 1 MiB lines built from each pattern's own
# pieces repeated; linear patterns finish in seconds, far inside the generous timeout.
_LONG_LINES = r"""
import sys
from mi50d.host import diagnose, gpus, preflight, vram
pieces = ["a", "0", " ", "TensileLibrary", "/dev/kfd", "rocBLAS error: ", "amdgpu: ",
          "hostname: ", "tensor '", "failed to open GGUF file '", " (1", "  x: ", "a: b ",
          "\n", " \n", "HSA_STATUS_ERROR_", "error loading model: ", "offloaded 0/",
          "CPU_Mapped model buffer size = ", "Name: gfx906 ", "x buffer size = 1"]
patterns = [s.pattern for s in diagnose.SIGNATURES] + [vram._BUFFER, gpus._ROCMINFO_GPU]
n = 1 << 20
lines = [(p * (n // len(p) + 1))[:n] for p in pieces]
for line in lines:
    for pattern in patterns:
        pattern.search(line)
    preflight._DEVICE_LINE.match(line)
diagnose.diagnose(lines)
vram.parse_buffers(lines)
preflight.parse_devices("\n".join(lines[:4]))
gpus.rocminfo_targets(lines[-2])
print(len(lines) * len(patterns))
"""


def test_megabyte_lines_are_matched_in_linear_time() -> None:
    done = subprocess.run([sys.executable, "-c", _LONG_LINES], capture_output=True, text=True,
                          timeout=300, check=False, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 21 * (len(SIGNATURES) + 2)


def test_only_the_start_of_a_long_line_is_diagnosed() -> None:
    head = "llama_model_load: error loading model: invalid magic characters"
    assert codes([head + "x" * (1 << 20)]) == ["model_invalid"]
    assert codes(["x" * MAX_SCAN + head]) == []


def test_rewritten_patterns_still_match_what_they_did() -> None:
    assert codes(["rocBLAS error: could not load the Tensile code object"]) == ["tensile_missing"]
    assert codes(["hipMalloc: /dev/kfd: Operation not permitted"]) == ["kfd_access"]
    assert codes(["[drm] amdgpu: GPU reset begin!"]) == ["gpu_hang"]
    assert codes(["rocblas: no /x/TensileLibrary_lazy_gfx906.dat here"]) == ["tensile_missing"]
    assert codes(["/dev/kfd then nothing", "Permission denied, but no kfd"]) == []
