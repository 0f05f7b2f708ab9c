"""The flash-attention default: on for instances that run on gfx906 GPUs, unless the instance
sets `flash_attn` itself.

Why: without flash attention ggml multiplies K and Q through BLAS with an f16 copy of the KQ
matrix from its memory pool, and HIP builds use the legacy pool (GGML_HIP_NO_VMM is on by
default), which keeps every buffer it allocates. One 32k-token prompt grew it by 14.6 GiB on the
same code built for CUDA (../shared/research/gpu-vram-cuda.md §5); with flash attention on it
did not grow. llama.cpp's own default, "auto", decides per device at load time; mi50d says "on"
so the command line, the VRAM estimate and the running process agree.

Applied once to a loaded configuration (`with_host_defaults`), so `--check-config` prints the
argv mi50d really runs and a reload compares like with like.
"""

from __future__ import annotations

from mi50d.config import Config, DaemonConfig, InstanceConfig
from mi50d.host import gpus as gpumod


def wants_flash_attn(inst: InstanceConfig, found: list[gpumod.Gpu]) -> bool:
    """Unset `flash_attn`, GPU layers wanted, and a gfx906 among the GPUs it would use."""
    if inst.flash_attn is not None or inst.n_gpu_layers == 0:
        return False
    chosen = [g for g in found if inst.gpus is None or g.index in inst.gpus]
    return any(g.is_mi50 for g in chosen)


def instance_defaults(inst: InstanceConfig, daemon: DaemonConfig,
                      found: list[gpumod.Gpu] | None = None) -> InstanceConfig:
    found = gpumod.list_gpus(daemon.host) if found is None else found
    return inst.model_copy(update={"flash_attn": "on"}) if wants_flash_attn(inst, found) else inst


def with_host_defaults(config: Config) -> Config:
    """`config` with each instance's host-dependent defaults filled in."""
    found = gpumod.list_gpus(config.daemon.host)
    if not found:
        return config
    instances = {name: instance_defaults(inst, config.daemon, found)
                 for name, inst in config.instances.items()}
    return config.model_copy(update={"instances": instances})
