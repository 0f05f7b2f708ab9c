"""Configuration: every bad file in fixtures/config/bad gives exactly the message its first line
expects; the good directory resolves to the exact llama-server command line and environment."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mi50d.config import ConfigError, load_config

FIXTURES = Path(__file__).parent / "fixtures" / "config"
BAD = sorted((FIXTURES / "bad").glob("*.toml"))
BAD_DAEMON = sorted((FIXTURES / "bad-daemon").glob("*.toml"))


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
        "--flash-attn", "on", "--threads", "12", "--alias", "gpt-oss-20b", "--jinja",
        "--metrics", "--no-webui",
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


@pytest.mark.parametrize("path", BAD_DAEMON, ids=[p.stem for p in BAD_DAEMON])
def test_bad_daemon_file_names_key_and_fix(path: Path, tmp_path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    shutil.copy(path, tmp_path / "mi50d.toml")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == [expected]


def test_defaults_typos_are_blamed_once_on_the_daemon_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(FIXTURES / "defaults-typo")
    assert info.value.problems == [
        "mi50d.toml: defaults.threads: Input should be a valid integer (got str '12'); "
        "write the number without quotes",
        "mi50d.toml: defaults.health.intervall_s: unknown key; did you mean 'interval_s'?",
        "mi50d.toml: defaults.flash_atn: unknown key; did you mean 'flash_attn'?",
    ]


def test_good_defaults_still_apply_next_to_bad_ones(tmp_path: Path) -> None:
    (tmp_path / "mi50d.toml").write_text('[defaults]\njinja = true\nthreads = "12"\n')
    (tmp_path / "a.toml").write_text('model = "/a.gguf"\nport = 8080\njinja = "no"\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert [p.split(":")[0:2] for p in info.value.problems] == [
        ["mi50d.toml", " defaults.threads"], ["a.toml", " jinja"]]


def test_a_fifo_named_like_a_config_file_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.toml")  # nobody writes: opening it for reading would block
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == ["pipe.toml: not a regular file; replace it with one"]


def test_oversized_and_non_utf8_files(tmp_path: Path) -> None:
    (tmp_path / "big.toml").write_bytes(b"#" * (2 << 20))
    (tmp_path / "latin.toml").write_bytes(b'model = "/m\xe9.gguf"\nport = 8080\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems == [
        "big.toml: 2097152 bytes, over the 1024 KiB a configuration file may have",
        "latin.toml: not UTF-8 (byte 11); save it as UTF-8",
    ]


def test_undecodable_file_name_is_shown_escaped(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(b"caf\xe9.toml")).write_text('model = "/m.gguf"\nport = 8080\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    (problem,) = info.value.problems
    assert problem.startswith("caf\\xe9.toml: file name: ")
    problem.encode("utf-8")  # printable by any UTF-8 terminal or JSON reply


def test_ipv6_and_host_names_are_accepted(tmp_path: Path) -> None:
    hosts = {"a": "::1", "b": "localhost", "c": "gpu-box.lan", "d": "0.0.0.0"}
    for port, (name, host) in enumerate(hosts.items(), 9000):
        (tmp_path / f"{name}.toml").write_text(
            f'model = "/m.gguf"\nport = {port}\nhost = "{host}"\ntemp = 1\n')
    config = load_config(tmp_path)
    assert config.instances["a"].endpoint() == "http://[::1]:9000"
    assert config.instances["c"].endpoint() == "http://gpu-box.lan:9002"
    assert config.instances["a"].temp == 1.0  # an integer where a float goes is fine
