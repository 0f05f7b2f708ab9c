"""mi50d.host.gpus on the recorded two-MI50 sysfs trees (16 GB + 32 GB), and on this host."""

from __future__ import annotations

import shutil
from pathlib import Path

from mi50d.config import HostPaths
from mi50d.host.gpus import list_gpus, rocm_version, rocminfo_targets, tensile_files

HOSTS = Path(__file__).parent / "fixtures" / "hosts"


def host(name: str, root: Path = HOSTS) -> HostPaths:
    return HostPaths(sysfs_root=root / name / "sys", dev_root=root / name / "dev",
                     rocm_path=root / name / "opt" / "rocm")


def test_two_mi50_inventory_and_telemetry() -> None:
    gpus = list_gpus(host("two-mi50"))
    assert [(g.index, g.node, g.gfx, g.render_minor) for g in gpus] == [
        (0, 1, "gfx906", 128), (1, 2, "gfx906", 129)]
    first, second = gpus
    assert first.is_mi50 and second.is_mi50
    assert first.render_node == HOSTS / "two-mi50" / "dev" / "dri" / "renderD128"
    assert (first.card, first.pci_address) == ("card0", "0000:03:00.0")
    assert (second.card, second.pci_address) == ("card1", "0000:83:00.0")
    assert first.vram_total == 16368 << 20
    assert second.vram_total == 32752 << 20
    assert first.vram_free == (16368 << 20) - 14495514624
    assert first.temperatures_c == {"edge": 61.0, "junction": 78.0, "mem": 70.0}
    assert first.power_w == 187.0 and first.busy_percent == 97
    assert second.busy_percent == 0
    assert first.to_json()["vram_free"] == first.vram_free


def test_missing_sensors_read_as_none_and_power_input_fallback(tmp_path: Path) -> None:
    shutil.copytree(HOSTS / "two-mi50", tmp_path / "h", symlinks=True)
    dev0 = tmp_path / "h/sys/devices/pci0000:00/0000:00:03.1/0000:03:00.0"
    shutil.rmtree(dev0 / "hwmon")
    (dev0 / "gpu_busy_percent").unlink()
    hw1 = tmp_path / "h/sys/devices/pci0000:80/0000:80:01.1/0000:83:00.0/hwmon/hwmon3"
    (hw1 / "power1_average").rename(hw1 / "power1_input")
    first, second = list_gpus(host("h", tmp_path))
    assert first.temperatures_c == {} and first.power_w is None and first.busy_percent is None
    assert first.vram_total is not None
    assert second.power_w == 21.0


def test_gpu_without_drm_device_still_listed(tmp_path: Path) -> None:
    shutil.copytree(HOSTS / "two-mi50", tmp_path / "h", symlinks=True)
    (tmp_path / "h/sys/class/drm/renderD129").unlink()
    gpus = list_gpus(host("h", tmp_path))
    assert gpus[1].gfx == "gfx906" and gpus[1].vram_total is None and gpus[1].vram_free is None


def test_rocm_version_and_tensile_files() -> None:
    assert rocm_version(host("two-mi50")) == (7, 0, 2)
    names = [p.name for p in tensile_files(host("two-mi50"))]
    assert "TensileLibrary_lazy_gfx906.dat" in names
    assert all("gfx906" in n for n in names)
    assert tensile_files(host("two-mi50-no-tensile")) == []
    assert tensile_files(host("two-mi50-no-tensile"), "gfx942") != []


def test_rocminfo_recording_lists_both_mi50() -> None:
    text = (HOSTS / "two-mi50" / "rocminfo.txt").read_text()
    assert rocminfo_targets(text) == ["gfx906", "gfx906"]


def test_host_without_kfd_has_no_gpus(tmp_path: Path) -> None:
    assert list_gpus(HostPaths(sysfs_root=tmp_path)) == []
    assert rocm_version(HostPaths(rocm_path=tmp_path)) is None
