"""What a process holds on each GPU, from the KFD's per-process sysfs files (recorded tree of a
two-MI50 host), and how the supervisor uses it for status and for the other instances' checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mi50ctl.render import status_table
from mi50d.host.gpumem import gpu_indices, process_vram
from tests.support import fake_daemon, fake_env, free_port, supervising, write_config

SYSFS = Path(__file__).parent / "fixtures" / "hosts" / "two-mi50" / "sys"
GIB13 = 13958643712


def test_recorded_process_holds_13_gib_on_gpu_0() -> None:
    assert gpu_indices(SYSFS) == {41279: 0, 5210: 1}
    assert process_vram(SYSFS, 4242) == {0: GIB13}  # 0 bytes on GPU 1 is not "held"
    assert process_vram(SYSFS, 1) == {}  # never opened /dev/kfd


@pytest.mark.asyncio
async def test_status_and_neighbours_carry_what_a_running_instance_holds(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    shutil.copytree(SYSFS, sysfs, symlinks=True)
    cfg = write_config(tmp_path / "conf", fake_daemon(host={"sysfs_root": str(sysfs)}), {
        "big": {"model": "/dev/null", "port": free_port(), "autostart": True, "gpus": [0],
                "env": fake_env()},
        "next": {"model": "/dev/null", "port": free_port(), "gpus": [0], "env": fake_env()}})
    async with supervising(cfg) as (sup, rec):
        await rec.wait("big", "running")
        pid = sup.status("big")[0].pid
        # What the kernel would show once the process allocated VRAM through /dev/kfd.
        proc = sysfs / "class/kfd/kfd/proc" / str(pid)
        proc.mkdir(parents=True)
        (proc / "vram_41279").write_text(f"{GIB13}\n")
        (st,) = sup.status("big")
        assert st.vram == {0: GIB13}
        assert "0(13.0GiB)" in status_table([st])
        (big,) = [o for o in sup.others("next") if o.name == "big"]
        assert big.running and dict(big.vram) == {0: GIB13}
        assert sup.status("next")[0].vram == {}  # not running: holds nothing
