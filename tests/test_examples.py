"""The shipped configuration: mi50d.toml and the seed guide's three servers as examples."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mi50d.config import load_config

ETC = Path(__file__).parents[1] / "etc" / "mi50d"
EXAMPLES = sorted((ETC / "examples").glob("*.toml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_loads_and_starts_nothing_by_itself(example: Path, tmp_path: Path) -> None:
    shutil.copy(ETC / "mi50d.toml", tmp_path)
    shutil.copy(example, tmp_path)
    config = load_config(tmp_path)
    (inst,) = config.instances.values()
    assert inst.autostart is False
    assert inst.environment({})["ROCR_VISIBLE_DEVICES"] == "0"


def test_qwen3_vl_32b_is_the_seed_command_with_its_own_projector(tmp_path: Path) -> None:
    shutil.copy(ETC / "mi50d.toml", tmp_path)
    shutil.copy(ETC / "examples" / "qwen3-vl-32b-thinking.toml", tmp_path / "qwen3-vl-32b.toml")
    config = load_config(tmp_path)
    argv = config.instances["qwen3-vl-32b"].argv(config.daemon)
    assert argv == [
        "/var/lib/mi50d/llama/current/bin/llama-server",
        "--model", "/mnt/ssd/models/Qwen3VL-32B-Thinking-Q4_K_M.gguf",
        "--mmproj", "/mnt/ssd/models/mmproj-Qwen3VL-32B-Thinking-F16.gguf",  # not the 8B's
        "--host", "0.0.0.0", "--port", "8081", "--ctx-size", "32768", "--n-gpu-layers", "all",
        "--flash-attn", "on", "--threads", "12", "--alias", "qwen3-vl-32b", "--temp", "1.0",
        "--top-p", "0.95", "--top-k", "20", "--presence-penalty", "0.0", "--jinja", "--metrics",
    ]


def test_gpt_oss_is_the_seed_command(tmp_path: Path) -> None:
    shutil.copy(ETC / "mi50d.toml", tmp_path)
    shutil.copy(ETC / "examples" / "gpt-oss-20b.toml", tmp_path)
    config = load_config(tmp_path)
    argv = config.instances["gpt-oss-20b"].argv(config.daemon)
    assert argv[1:] == ["--model", "/mnt/ssd/models/gpt-oss-20b-mxfp4.gguf", "--host", "0.0.0.0",
                        "--port", "8080", "--ctx-size", "0", "--n-gpu-layers", "all",
                        "--threads", "12", "--alias", "gpt-oss-20b", "--jinja", "--metrics"]
