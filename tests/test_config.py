"""Configuration: every bad file in fixtures/config/bad gives exactly the message its first line
expects; the good directory resolves to the exact llama-server command line and environment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mi50d.config import ConfigError, load_config

FIXTURES = Path(__file__).parent / "fixtures" / "config"
BAD = sorted((FIXTURES / "bad").glob("*.toml"))


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_file_names_file_key_and_fix(path: Path, tmp_path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    shutil.copy(path, tmp_path / path.name)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == [expected]


def test_good_directory_resolves_exact_command_and_environment() -> None:
    config = load_config(FIXTURES / "good")
    inst = config.instances["gpt-oss-20b"]
    assert inst.argv(config.daemon) == [
        "/opt/llama/bin/llama-server", "--model", "/mnt/ssd/models/gpt-oss-20b-mxfp4.gguf",
        "--host", "0.0.0.0", "--port", "8080", "--ctx-size", "0", "--n-gpu-layers", "all",
        "--flash-attn", "on", "--threads", "12", "--jinja", "--no-webui",
    ]
    env = inst.environment({"PATH": "/usr/bin", "HIP_VISIBLE_DEVICES": "1", "NOTIFY_SOCKET": "/x"})
    assert env == {"PATH": "/usr/bin", "ROCR_VISIBLE_DEVICES": "0",
                   "HSA_OVERRIDE_GFX_VERSION": "9.0.6"}
    assert inst.health.interval_s == 2.5  # from [defaults.health]
    assert inst.health.timeout_s == 3.0  # built-in default kept beside it
    assert inst.endpoint() == "http://127.0.0.1:8080"


def test_two_instances_on_one_port_is_an_error(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.toml").write_text('model = "/m.gguf"\nport = 9000\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == ["b.toml: port: 9000 is already used by a.toml; pick a free port"]


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    for path in BAD[:3]:
        shutil.copy(path, tmp_path / path.name)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert len(info.value.problems) == 3


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        load_config(tmp_path / "nope")
