"""GPU inventory and telemetry from sysfs, without rocm-smi. Standard library only.

A GPU's index is its position among the GPU nodes of the KFD topology (`mi50d.host.kfd`), which is the
order ROCr enumerates agents in and so the index ROCR_VISIBLE_DEVICES takes. Each KFD node names
its DRM render minor; `/sys/class/drm/renderD<minor>` leads to the PCI device with the amdgpu
files read here: VRAM (`mem_info_vram_total/used`, bytes), load (`gpu_busy_percent`), and the
hwmon sensors (temperatures in m°C labelled edge/junction/mem, power in µW, clocks in Hz labelled
sclk/mclk), and the card's `unique_id` where the kernel has one (Vega20 does). Every read root comes
from `HostPaths`; a file that is missing reads as None, never as an error.
This module also owns parsing `rocminfo` output, for doctor's cross-check with KFD.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mi50d.config import HostPaths
from mi50d.host import kfd

MI50_TARGET = "gfx906"
# [ \t], not \s: with MULTILINE, \s* would run across line ends from every line start (quadratic)
_ROCMINFO_GPU = re.compile(r"^[ \t]*Name:[ \t]+(gfx[0-9a-f]+)[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class Gpu:
    index: int
    node: int
    gfx: str
    render_minor: int
    render_node: Path
    card: str | None = None
    pci_address: str | None = None
    vram_total: int | None = None
    vram_used: int | None = None
    busy_percent: int | None = None
    temperatures_c: Mapping[str, float] = field(default_factory=dict)
    power_w: float | None = None
    clocks_hz: Mapping[str, int] = field(default_factory=dict)
    unique_id: str | None = None

    @property
    def vram_free(self) -> int | None:
        if self.vram_total is None or self.vram_used is None:
            return None
        return max(self.vram_total - self.vram_used, 0)

    @property
    def is_mi50(self) -> bool:
        return self.gfx == MI50_TARGET

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "node": self.node, "gfx": self.gfx,
                "render_node": str(self.render_node), "card": self.card, "pci": self.pci_address,
                "vram_total": self.vram_total, "vram_used": self.vram_used,
                "vram_free": self.vram_free, "busy_percent": self.busy_percent,
                "temperatures_c": dict(self.temperatures_c), "power_w": self.power_w}


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def list_gpus(host: HostPaths) -> list[Gpu]:
    """The GPUs in KFD order, with what sysfs says about each right now; [] without a KFD."""
    gpus = []
    nodes = kfd.node_properties(host.sysfs_root)
    gpu_nodes = [(n, p) for n, p in nodes.items() if p.get("gfx_target_version", 0) > 0]
    for index, (node, props) in enumerate(gpu_nodes):
        minor = props.get("drm_render_minor", 0)
        render = host.dev_root / "dri" / f"renderD{minor}"
        base = Gpu(index, node, kfd.gfx_name(props["gfx_target_version"]), minor, render)
        device = _pci_device(host, minor)
        gpus.append(_with_device(base, device) if device else base)
    return gpus


def _pci_device(host: HostPaths, minor: int) -> Path | None:
    """The PCI device directory of render node `minor`: /sys/class/drm/renderD128 links to
    /sys/devices/<pci path>/<bdf>/drm/renderD128, two levels below the device. (Going up the
    link rather than through its `device` symlink keeps fixture trees free of sysfs's cycles.)"""
    link = host.sysfs_root / "class" / "drm" / f"renderD{minor}"
    if not link.exists():
        return None
    device = Path(os.path.realpath(link)).parent.parent
    return device if (device / "drm").is_dir() else None


def _with_device(gpu: Gpu, device: Path) -> Gpu:
    cards = sorted(p.name for p in (device / "drm").glob("card[0-9]*"))
    hwmon = _hwmon(device)
    return Gpu(
        index=gpu.index, node=gpu.node, gfx=gpu.gfx, render_minor=gpu.render_minor,
        render_node=gpu.render_node,
        card=cards[0] if cards else None,
        pci_address=device.name,
        vram_total=_read_int(device / "mem_info_vram_total"),
        vram_used=_read_int(device / "mem_info_vram_used"),
        busy_percent=_read_int(device / "gpu_busy_percent"),
        temperatures_c=_temperatures(hwmon) if hwmon else {},
        power_w=_power(hwmon) if hwmon else None,
        clocks_hz=_labelled(hwmon, "freq") if hwmon else {},
        unique_id=_read_text(device / "unique_id"),
    )


def _hwmon(device: Path) -> Path | None:
    found = sorted((device / "hwmon").glob("hwmon[0-9]*"))
    return found[0] if found else None


def _temperatures(hwmon: Path) -> dict[str, float]:
    return {label: value / 1000 for label, value in _labelled(hwmon, "temp").items()}


def _labelled(hwmon: Path, kind: str) -> dict[str, int]:
    """`<kind>N_input` values by their `<kind>N_label` (else by `<kind>N`)."""
    found = {}
    for sensor in sorted(hwmon.glob(f"{kind}[0-9]*_input")):
        prefix = sensor.name.removesuffix("_input")
        value = _read_int(sensor)
        if value is None:
            continue
        found[_read_text(hwmon / f"{prefix}_label") or prefix] = value
    return found


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _power(hwmon: Path) -> float | None:
    # Vega20 kernels expose power1_average; newer kernels may offer only power1_input.
    for name in ("power1_average", "power1_input"):
        value = _read_int(hwmon / name)
        if value is not None:
            return value / 1_000_000
    return None


def rocminfo_targets(text: str) -> list[str]:
    """The gfx names of the GPU agents in `rocminfo` output, in agent order."""
    return _ROCMINFO_GPU.findall(text)


def rocm_version(host: HostPaths) -> tuple[int, ...] | None:
    """ROCm's version from `<rocm>/.info/version` ("7.0.2-56" -> (7, 0, 2)); None if absent."""
    try:
        text = (host.rocm_path / ".info" / "version").read_text().strip()
    except OSError:
        return None
    numbers = re.match(r"(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in numbers.group(1).split(".")) if numbers else None


def tensile_files(host: HostPaths, target: str = MI50_TARGET) -> list[Path]:
    """rocBLAS's Tensile kernel files for `target`; ROCm >= 6.4 ships none for gfx906."""
    library = host.rocm_path / "lib" / "rocblas" / "library"
    return sorted(library.glob(f"*{target}*")) if library.is_dir() else []
