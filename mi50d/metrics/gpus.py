"""GPU series from sysfs, read when scraped (`mi50d.host.gpus`), in base units.

Every series is labelled `gpu` with the card's PCI address, which stays with a card across
reboots (card numbers and render minors need not); `mi50d_gpu_info` maps it to the KFD index
that `gpus = [...]` in instance files uses, the DRM card and the unique id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric

from mi50d.host.gpus import Gpu

# sysfs calls the memory sensor "mem"; the series names it in full.
_SENSORS = {"mem": "memory"}


def gpu_label(gpu: Gpu) -> str:
    """The `gpu` label: the PCI address, or the KFD node where sysfs has no PCI device."""
    return gpu.pci_address or f"kfd-node-{gpu.node}"


def gpu_families(gpus: Sequence[Gpu]) -> Iterable[Metric]:
    info = GaugeMetricFamily(
        "mi50d_gpu_info", "A GPU (always 1): its KFD index (the `gpus` of instance files), gfx "
        "target, DRM card and unique id", labels=["gpu", "index", "gfx", "card", "unique_id"])
    used = GaugeMetricFamily("mi50d_gpu_vram_used_bytes", "VRAM in use on the GPU (sysfs "
                             "mem_info_vram_used), every process included", labels=["gpu"])
    total = GaugeMetricFamily("mi50d_gpu_vram_total_bytes", "VRAM of the GPU (sysfs "
                              "mem_info_vram_total)", labels=["gpu"])
    busy = GaugeMetricFamily("mi50d_gpu_busy_ratio", "Share of time the GPU was busy, 0-1 "
                             "(sysfs gpu_busy_percent / 100)", labels=["gpu"])
    temp = GaugeMetricFamily("mi50d_gpu_temperature_celsius", "GPU temperature by hwmon sensor "
                             "(edge, junction, memory)", labels=["gpu", "sensor"])
    power = GaugeMetricFamily("mi50d_gpu_power_watts", "GPU power draw (hwmon power1_average, "
                              "else power1_input)", labels=["gpu"])
    clock = GaugeMetricFamily("mi50d_gpu_clock_hertz", "Current GPU clock by hwmon label "
                              "(sclk: shader, mclk: memory)", labels=["gpu", "clock"])
    for g in gpus:
        label = gpu_label(g)
        info.add_metric([label, str(g.index), g.gfx, g.card or "", g.unique_id or ""], 1)
        if g.vram_used is not None:
            used.add_metric([label], g.vram_used)
        if g.vram_total is not None:
            total.add_metric([label], g.vram_total)
        if g.busy_percent is not None:
            busy.add_metric([label], g.busy_percent / 100)
        for sensor, celsius in g.temperatures_c.items():
            temp.add_metric([label, _SENSORS.get(sensor, sensor)], celsius)
        if g.power_w is not None:
            power.add_metric([label], g.power_w)
        for name, hz in g.clocks_hz.items():
            clock.add_metric([label, name], hz)
    return [info, used, total, busy, temp, power, clock]
