"""The flash-attention policy of VRAM model v2: `flash_attn` defaults to on for instances on gfx906
GPUs (the recorded two-MI50 tree), unless set; with "off" the legacy pool is counted and `check`
warns with the numbers."""

from __future__ import annotations

import getpass
import subprocess
import sys
from pathlib import Path

from mi50d.config import DaemonConfig, HostPaths, InstanceConfig
from mi50d.host import flashattn
from mi50d.host.ggufmeta import read_gguf
from mi50d.host.gpus import Gpu, list_gpus
from mi50d.host.vram import GiB, check_fit, estimate, gib, pool_bytes
from tests.ggufwriter import write_model

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
TWO_MI50 = HostPaths(sysfs_root=HOSTS / "two-mi50" / "sys")
MI50D = str(Path(sys.executable).with_name("mi50d"))


def inst(model: Path, **keys: object) -> InstanceConfig:
    return InstanceConfig.model_validate(
        {"model": model, "port": 8080, "name": "m", "source": model.with_suffix(".toml"), **keys})


def test_on_by_default_for_gfx906_unless_set() -> None:
    daemon = DaemonConfig(host=TWO_MI50)
    m = Path("/m.gguf")
    assert flashattn.instance_defaults(inst(m), daemon).flash_attn == "on"
    assert flashattn.instance_defaults(inst(m, gpus=[1]), daemon).flash_attn == "on"
    for chosen in ("off", "auto"):
        assert flashattn.instance_defaults(inst(m, flash_attn=chosen), daemon).flash_attn == chosen
    assert flashattn.instance_defaults(inst(m, n_gpu_layers=0), daemon).flash_attn is None
    no_gpu = DaemonConfig(host=HostPaths(sysfs_root=HOSTS / "nowhere"))
    assert flashattn.instance_defaults(inst(m), no_gpu).flash_attn is None
    other = Gpu(index=0, node=1, gfx="gfx90a", render_minor=128, render_node=Path("/dev/x"))
    assert not flashattn.wants_flash_attn(inst(m), [other])


def test_check_config_shows_the_default(tmp_path: Path) -> None:
    (tmp_path / "mi50d.toml").write_text(f'user = "{getpass.getuser()}"\n[host]\n'
                                         f'sysfs_root = "{TWO_MI50.sysfs_root}"\n')
    (tmp_path / "a.toml").write_text('model = "/m/a.gguf"\nport = 8001\n')
    (tmp_path / "b.toml").write_text('model = "/m/b.gguf"\nport = 8002\nflash_attn = "off"\n')
    (tmp_path / "c.toml").write_text('model = "/m/c.gguf"\nport = 8003\nn_gpu_layers = 0\n')
    out = subprocess.run([MI50D, "--check-config", "--config-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    by_name = {c.split("]")[0].lstrip("["): c for c in out.split("\n\n")[1:]}
    assert sorted(by_name) == ["a", "b", "c"]
    assert "--flash-attn on" in by_name["a"]
    assert "--flash-attn off" in by_name["b"]
    assert "--flash-attn" not in by_name["c"]


def test_fa_off_is_counted_and_warned(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", n_embd=256, n_head=8, n_ctx_train=32768)
    model = read_gguf(path)
    gpu1 = list_gpus(TWO_MI50)[1]  # the 32 GB MI50: 32752 MiB, mostly free
    on = estimate(inst(path, ctx_size=32768), model)
    off = estimate(inst(path, ctx_size=32768, flash_attn="off"), model)
    assert on.pool == 0 and off.pool == pool_bytes(32768, 8)
    assert off.pool > 3 * GiB  # a full 32k prompt, 8 heads: ~3.6 GiB kept by the pool
    assert check_fit(on, [gpu1], {}).status == "ok"
    check = check_fit(off, [gpu1], {})
    assert check.status == "warn"
    assert f"memory pool may then keep up to ~{gib(off.pool)} more per GPU" in check.message
    assert check.fix is not None and check.fix.startswith('set flash_attn = "on"')
    assert check.data["estimate"]["pool"] == off.pool


def test_fa_off_past_the_free_memory_says_so(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", n_embd=256, n_head=32, n_ctx_train=65536)
    model = read_gguf(path)
    gpu0 = list_gpus(TWO_MI50)[0]  # 16 GB, 2.5 GiB free in the recorded sysfs
    off = estimate(inst(path, ctx_size=8192, flash_attn="off"), model)
    check = check_fit(off, [gpu0], {})
    assert check.status == "warn", check.line()
    assert "past what is free (GPU 0 has 2.5 GiB free)" in check.message
    too_big = estimate(inst(path, ctx_size=65536, flash_attn="off"), model)
    refused = check_fit(too_big, [gpu0], {})
    assert refused.status == "fail"
    assert refused.fix is not None and refused.fix.startswith('set flash_attn = "on", lower')
