"""The VRAM a process holds on each GPU, from the KFD's per-process files in sysfs.

The kernel's KFD lists every process that opened /dev/kfd under `<sysfs>/class/kfd/kfd/proc/<pid>/`
with one `vram_<gpu_id>` file per GPU (bytes; what rocm-smi --showpids reads). `gpu_id` is the
topology node's `gpu_id` file; the GPU's index is its place among the GPU nodes, the same index
`gpus` and ROCR_VISIBLE_DEVICES use. llama-server prints its buffer sizes only at debug verbosity
(~35 lines per request in this version), so this is how mi50d knows what a running instance holds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mi50d.host import kfd

PROC = Path("class/kfd/kfd/proc")


def gpu_indices(sysfs_root: Path) -> dict[int, int]:
    """{gpu_id: index} for the GPU nodes of the topology."""
    out: dict[int, int] = {}
    gpu_nodes = [n for n, p in kfd.node_properties(sysfs_root).items()
                 if p.get("gfx_target_version", 0) > 0]
    for index, node in enumerate(gpu_nodes):
        try:
            gpu_id = int((sysfs_root / kfd.NODES / str(node) / "gpu_id").read_text())
        except (OSError, ValueError):
            continue
        out[gpu_id] = index
    return out


def process_vram(sysfs_root: Path, pid: int,
                 indices: Mapping[int, int] | None = None) -> dict[int, int]:
    """{GPU index: bytes} that `pid` holds; {} for a process that never opened /dev/kfd.
    `indices` is `gpu_indices(sysfs_root)`, for callers that ask about many processes at once."""
    base = os.path.join(sysfs_root, PROC, str(pid))
    try:
        names = [n for n in os.listdir(base) if n.startswith("vram_")]  # not Path.glob: 10x faster
    except OSError:
        return {}
    if indices is None:
        indices = gpu_indices(sysfs_root)
    held: dict[int, int] = {}
    for name in names:
        try:
            with open(os.path.join(base, name)) as f:
                gpu_id, size = int(name.removeprefix("vram_")), int(f.read())
        except (OSError, ValueError):
            continue
        if gpu_id in indices and size > 0:
            held[indices[gpu_id]] = size
    return held
