"""Known failure signatures in llama-server's output, each turned into one line with the fix.

The signatures are the messages real builds print: llama.cpp's own (server-http.cpp "couldn't bind
HTTP server socket", gguf.cpp "failed to open GGUF file", ggml-cuda.cu "cudaMalloc failed: out of
memory" and "<backend> error: invalid device function", "ggml_cuda_init: failed to initialize
ROCm", mtmd.cpp "mismatch between text model ... and mmproj"), and those of the ROCm libraries
under it (rocBLAS "Cannot read ... TensileLibrary.dat", ROCr "HSA_STATUS_ERROR_*", "HW Exception
by GPU node-N ... reason :GPU Hang").
Some are not errors but a silent CPU fallback: /health answers 200 while every layer runs on the
CPU. Those diagnoses are `degraded`, for instances that asked for GPUs.
This module owns the table and matching; it is pure (lines in, diagnoses out).

Matching is linear in a line's length: llama-server's output is anyone's input (a prompt echoed
in a log line can be megabytes), so no pattern may retry a scan from every position. "A, then B
later on the line" is written `_then(A, B)`: the first A only (an atomic group, anchored at the
start), then one greedy scan for B. Only the first MAX_SCAN characters of a line are looked at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnosis:
    code: str
    message: str
    fix: str
    degraded: bool = False  # running, but on the CPU instead of the GPUs it was given

    def line(self) -> str:
        return f"{self.message}; fix: {self.fix}"


@dataclass(frozen=True)
class _Signature:
    code: str
    pattern: re.Pattern[str]
    message: str  # may use the pattern's named groups
    fix: str
    degraded: bool = False
    gpu_only: bool = False  # only a problem for instances that asked for GPUs


MAX_SCAN = 4096  # real diagnostic lines are < 500 characters


def _sig(code: str, pattern: str, message: str, fix: str, **flags: bool) -> _Signature:
    return _Signature(code, re.compile(pattern), message, fix, **flags)


def _then(first: str, later: str) -> str:
    """A line with `first` and, somewhere after it, `later`, in one pass: `first.*later` would
    scan to the end of the line again from every occurrence of `first`."""
    return rf"\A(?>.*?(?:{first})).*(?:{later})"


# First match wins within a line, so the specific signatures come before the general ones.
SIGNATURES: tuple[_Signature, ...] = (
    _sig("tensile_missing",
         r"(?<!\w)TensileLibrary\w*+\.dat|Could not (?:initialize|load) Tensile|"
         + _then("rocBLAS error: ", "Tensile"),
         "rocBLAS has no Tensile kernels for gfx906 (\"Cannot read TensileLibrary.dat\")",
         "install rocBLAS's gfx906 files into /opt/rocm/lib/rocblas/library (ROCm >= 6.4 "
         "ships none; mi50ctl doctor shows the check)"),
    _sig("rpc_unreachable",
         r"Failed to connect to (?P<endpoint>[^\s:]{1,253}:\d{1,5})",
         "RPC worker {endpoint} unreachable (llama-server could not connect to it)",
         "start the worker (mi50ctl status on its host) and check that its allow lists this "
         "host; mi50d restarts this instance by its policy meanwhile"),
    _sig("rpc_worker_lost",
         r"Remote RPC server crashed or returned malformed response",
         "an RPC worker went away mid-run (\"Remote RPC server crashed\")",
         "mi50ctl status on the worker's host says why; mi50d restarts this instance by its "
         "policy once the worker answers again"),
    _sig("out_of_memory",
         r"cudaMalloc failed: out of memory|hipErrorOutOfMemory|unable to allocate (?:ROCm|CUDA)"
         r"\d* buffer|failed to allocate buffer for kv cache|failed to allocate compute "
         r"(?:pp |tg )?buffers|HSA_STATUS_ERROR_OUT_OF_RESOURCES|out of device memory",
         "out of GPU memory while loading the model or allocating its context",
         "lower ctx_size or n_gpu_layers, stop another instance on that GPU, or use a smaller "
         "quantization"),
    _sig("invalid_device_function",
         r"invalid device function|hipErrorInvalidDeviceFunction|hipErrorNoBinaryForGpu|"
         r"Unable to find code object for all current devices",
         "llama-server was built without kernels for this GPU (\"invalid device function\")",
         "rebuild for the MI50: mi50ctl build-llama --targets gfx906"),
    _sig("kfd_access",
         r"Unable to open /dev/kfd|" + _then("/dev/kfd", "Permission denied|Operation not permitted"),
         "the process cannot open /dev/kfd",
         "give the service account the render and video groups and check /dev/kfd's udev "
         "rule (mi50ctl doctor)"),
    _sig("no_rocm_device",
         r"failed to initialize (?:ROCm|CUDA): (?P<why>[^\n]*)|no usable GPU found",
         "no ROCm device visible: running on the CPU",
         "check GPU access and gpus/ROCR_VISIBLE_DEVICES with mi50ctl doctor",
         degraded=True, gpu_only=True),
    _sig("cpu_only",
         r"offloaded 0/\d+ layers to GPU",
         "no layer was offloaded to a GPU: running on the CPU",
         "use a HIP build (mi50ctl build-llama --targets gfx906) and check n_gpu_layers",
         degraded=True, gpu_only=True),
    _sig("port_in_use",
         r"couldn't bind HTTP server socket, hostname: (?P<host>\S+), port: (?P<port>\d+)|"
         r"Address already in use",
         "the port is already taken",
         "stop whatever listens there (ss -ltnp) or change port in the instance file"),
    _sig("model_open_failed",
         r"failed to open GGUF file '(?P<path>[^']*)' \((?P<why>[^)]*)\)",
         "cannot open the model {path}: {why}",
         "check the path, the mount and that the service account can read it "
         "(mi50ctl check NAME)"),
    _sig("unknown_architecture",
         r"unknown model architecture: '(?P<arch>[^']*)'",
         "this llama.cpp build does not know the model architecture '{arch}'",
         "update llama.cpp: mi50ctl build-llama"),
    _sig("model_truncated",
         r"tensor '(?P<tensor>[^']*)' data is not within the file bounds",
         "the model file is truncated (tensor {tensor} lies beyond its end)",
         "download or copy it again; mi50ctl check NAME verifies the size"),
    _sig("mmproj_mismatch",
         r"mismatch between text model \(n_embd = (?P<text>\d+)\) and mmproj "
         r"\(n_embd = (?P<mmproj>\d+)\)",
         "the mmproj makes {mmproj}-wide embeddings but the model takes {text}: a projector "
         "of another model",
         "set mmproj to the projector published with this model (mi50ctl check NAME compares "
         "the two headers)"),
    _sig("model_invalid",
         r"error loading model: (?:llama_model_loader: )?(?P<why>.*)|"
         r"(?P<header>failed to read header|invalid magic characters|failed to read magic)",
         "llama-server could not load the model: {why}",
         "verify it with mi50ctl check NAME; re-download it or update llama.cpp "
         "(mi50ctl build-llama)"),
    _sig("gpu_hang",
         r"HW Exception by GPU node-\d+|reason ?:GPU Hang|GPU reset|" + _then("amdgpu: ", "reset"),
         "the GPU hung and was reset",
         "check temperatures and power (mi50ctl doctor) and dmesg; the instance restarts"),
    _sig("hsa_error",
         r"(?P<status>HSA_STATUS_ERROR_\w+)",
         "ROCm runtime error {status}",
         "see dmesg for amdgpu errors; a memory fault usually means a bad build or a driver "
         "problem (rebuild with mi50ctl build-llama)"),
    _sig("shared_library",
         r"error while loading shared libraries: (?P<lib>[^:]+)",
         "llama-server cannot load {lib}",
         "install the ROCm runtime it was built against, or rebuild: mi50ctl build-llama"),
)


# llama.cpp follows these with a generic "error loading model: ..." line.
_SPECIFIC_LOAD_ERRORS = frozenset({"model_open_failed", "model_truncated", "unknown_architecture",
                                   "out_of_memory"})


def diagnose_line(line: str, *, expects_gpu: bool = True) -> Diagnosis | None:
    """The diagnosis for one output line (its first MAX_SCAN characters), or None."""
    line = line[:MAX_SCAN]
    for sig in SIGNATURES:
        if sig.gpu_only and not expects_gpu:
            continue
        m = sig.pattern.search(line)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            groups.setdefault("why", groups.get("header", "not a valid GGUF"))
            message = sig.message.format_map(_Default(groups))
            if sig.code == "port_in_use" and "port" in groups:
                message = f"port {groups['port']} on {groups['host']} is already taken"
            return Diagnosis(sig.code, message, sig.fix, sig.degraded)
    return None


def diagnose(lines: Iterable[str], *, expects_gpu: bool = True) -> list[Diagnosis]:
    """Distinct diagnoses (one per code, the first seen) in order of appearance."""
    found: dict[str, Diagnosis] = {}
    for line in lines:
        d = diagnose_line(line, expects_gpu=expects_gpu)
        if d is not None and d.code not in found:
            found[d.code] = d
    if found.keys() & _SPECIFIC_LOAD_ERRORS:
        found.pop("model_invalid", None)  # its line only repeats the specific cause
    return list(found.values())


def degraded(lines: Iterable[str], *, expects_gpu: bool = True) -> bool:
    """True when the output shows a silent CPU fallback for an instance that asked for GPUs."""
    return any(d.degraded for d in diagnose(lines, expects_gpu=expects_gpu))


class _Default(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "?"
