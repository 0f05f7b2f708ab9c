"""The engine's two hooks into the host checks: preflight before every spawn, and a diagnosis of
an instance's last output lines after a failure (fatal ones stop the restart loop)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mi50d.config import DaemonConfig, InstanceConfig
from mi50d.configtypes import rpc_host_port
from mi50d.host import diagnose as diag
from mi50d.host.accounts import Account
from mi50d.host.checks import Transient
from mi50d.host.preflight import Other, expects_gpu, run_preflight
from mi50d.host.rpchello import HelloError, hello

# Retrying the same launch cannot fix these: the file, the build, the port or the VRAM is wrong.
FATAL_CODES = frozenset({
    "tensile_missing", "out_of_memory", "invalid_device_function", "kfd_access", "port_in_use",
    "model_open_failed", "unknown_architecture", "model_truncated", "model_invalid",
    "shared_library", "mmproj_mismatch",
})


def preflight_job(
    inst: InstanceConfig, daemon: DaemonConfig, account: Account | None, others: Sequence[Other],
    units: bool = False,
) -> Callable[[], str | None]:
    """A job for a worker thread: None when every check passed, else the first failure's line."""

    def job() -> str | None:
        for check in run_preflight(inst, daemon, account, others, units=units):
            if check.failed:
                return Transient(check.line()) if check.data.get("transient") else check.line()
        return None

    return job


def diagnose_failure(inst: InstanceConfig) -> Callable[[Sequence[str]], tuple[str, bool] | None]:
    wants_gpu = expects_gpu(inst)

    def read(lines: Sequence[str]) -> tuple[str, bool] | None:
        found = diag.diagnose(lines, expects_gpu=wants_gpu)
        if not found:
            return None
        first = found[0]
        if first.code == "rpc_worker_lost" and inst.rpc:
            gone = unreachable_workers(inst.rpc)
            if gone:
                return (f"{'; '.join(gone)} (llama-server lost it mid-run); fix: "
                        f"{first.fix}", False)
        return first.line(), first.code in FATAL_CODES

    return read


def unreachable_workers(endpoints: Sequence[str], timeout_s: float = 1.0) -> list[str]:
    """"RPC worker HOST:PORT unreachable (why)" for each of `endpoints` that answers no hello."""
    gone = []
    for endpoint in endpoints:
        try:
            hello(*rpc_host_port(endpoint), timeout_s)
        except HelloError as exc:
            gone.append(f"RPC worker {endpoint} unreachable ({exc})")
    return gone


def degraded_reason(inst: InstanceConfig) -> Callable[[Sequence[str]], str | None]:
    """Read once the instance is ready: a silent CPU fallback for an instance that wanted GPUs
    answers /health with 200 all the same, so it is marked degraded with the reason."""
    wants_gpu = expects_gpu(inst)

    def read(lines: Sequence[str]) -> str | None:
        found = [d for d in diag.diagnose(lines, expects_gpu=wants_gpu) if d.degraded]
        return f"degraded: {found[0].line()}" if found else None

    return read
