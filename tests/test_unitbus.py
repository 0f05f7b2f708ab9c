"""The pure parts of instances-as-units: the recorded launch, unit names, the mode's choice.
The units themselves are tested under real systemd in tests/systemd/test_units_e2e.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mi50d.engine.unitbus import (
    description,
    digest_of,
    instance_of,
    launch_digest,
    transient_properties,
    unit_name,
)
from mi50d.engine.units import units_wanted
from mi50d.host import firewall
from mi50d.host.accounts import Account

ACCOUNT = Account(name="mi50d", uid=990, gid=990, groups=(44, 105, 990), home="/var/lib/mi50d")


@pytest.fixture
def binary(tmp_path: Path) -> str:
    path = tmp_path / "llama-server"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return str(path)


def test_unit_names_round_trip() -> None:
    assert unit_name("qwen3-vl-32b") == "mi50d@qwen3-vl-32b.service"
    assert instance_of("mi50d@qwen3-vl-32b.service") == "qwen3-vl-32b"
    assert instance_of("mi50d.service") is None
    assert instance_of("mi50d@.service") is None


def test_digest_is_read_back_from_the_description() -> None:
    assert digest_of(description("tiny", "abc123")) == "abc123"
    assert digest_of("mi50d instance tiny") is None
    assert digest_of("something (launch x) else") is None


def test_launch_digest_ignores_per_invocation_variables(binary: str) -> None:
    env = {"PATH": "/usr/bin", "LANG": "C.UTF-8"}
    one = launch_digest([binary, "--port", "8080"], {**env, "INVOCATION_ID": "a" * 32,
                                                     "JOURNAL_STREAM": "8:1"}, ACCOUNT)
    two = launch_digest([binary, "--port", "8080"], {**env, "INVOCATION_ID": "b" * 32}, ACCOUNT)
    assert one == two


def test_launch_digest_changes_with_each_part_of_the_launch(binary: str) -> None:
    env = {"PATH": "/usr/bin"}
    base = launch_digest([binary, "--port", "8080"], env, ACCOUNT)
    assert launch_digest([binary, "--port", "8081"], env, ACCOUNT) != base
    assert launch_digest([binary, "--port", "8080"], {**env, "HIP_X": "1"}, ACCOUNT) != base
    other = Account(name="mi50d", uid=990, gid=990, groups=(990,), home="/var/lib/mi50d")
    assert launch_digest([binary, "--port", "8080"], env, other) != base
    assert launch_digest([binary, "--port", "8080"], env, None) != base
    # The same path, another build (an upgrade in place).
    st = os.stat(binary)
    os.utime(binary, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert launch_digest([binary, "--port", "8080"], env, ACCOUNT) != base


def test_transient_properties_carry_the_launch(binary: str) -> None:
    props = dict(transient_properties("tiny", "d1", [binary, "-m", "x.gguf"],
                                      {"PATH": "/usr/bin", "INVOCATION_ID": "z"}, ACCOUNT, "/",
                                      3.0))
    assert props["ExecStart"].unpack() == [(binary, [binary, "-m", "x.gguf"], False)]
    assert props["Environment"].unpack() == ["PATH=/usr/bin"]
    assert props["User"].unpack() == "990"
    assert props["SupplementaryGroups"].unpack() == ["44", "105"]
    assert props["KillMode"].unpack() == "mixed"
    assert props["TimeoutStopUSec"].unpack() == 3_000_000
    assert digest_of(props["Description"].unpack()) == "d1"


def test_a_guarded_unit_runs_its_nft_script_privileged_around_its_run(binary: str) -> None:
    pre, post = ["/usr/sbin/nft", "table inet mi50d_w {}"], ["/usr/sbin/nft", "delete table x"]
    props = dict(transient_properties("w", "d1", [binary], {}, ACCOUNT, "/", 3.0,
                                      allow=["10.0.0.0/24"], guard=(pre, post)))
    assert props["ExecStartPreEx"].unpack() == [(pre[0], pre, ["privileged", "no-env-expand"])]
    assert props["ExecStopPostEx"].unpack() == [
        (post[0], post, ["privileged", "no-env-expand", "ignore-failure"])]
    assert props["IPAddressAllow"].unpack() == [(2, [10, 0, 0, 0], 24)]
    plain = dict(transient_properties("w", "d1", [binary], {}, ACCOUNT, "/", 3.0))
    assert "ExecStartPreEx" not in plain and "IPAddressAllow" not in plain


@pytest.mark.skipif(os.geteuid() != 0 or firewall.nft_path() is None, reason="needs root and nft")
def test_the_units_nft_commands_install_and_remove_the_table() -> None:
    """What the unit runs, run here: nft takes the whole script as one argument."""
    pre, post = firewall.unit_commands("unitbus_t", 50999, ["10.9.0.0/24", "fd09::/64"])
    assert subprocess.run(pre, check=False).returncode == 0
    listed = subprocess.run(["nft", "list", "table", "inet", "mi50d_unitbus_t"], check=True,
                            capture_output=True, text=True).stdout
    assert "tcp dport 50999 ip saddr 10.9.0.0/24 accept" in listed
    assert "tcp dport 50999 reject with tcp reset" in listed
    assert subprocess.run(post, check=False).returncode == 0
    gone = subprocess.run(["nft", "list", "table", "inet", "mi50d_unitbus_t"], check=False,
                          capture_output=True)
    assert gone.returncode != 0


def test_mode_follows_systemd_and_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MI50D_INSTANCES", raising=False)
    assert units_wanted(False) is False
    monkeypatch.setenv("MI50D_INSTANCES", "units")
    assert units_wanted(False) is True
    monkeypatch.setenv("MI50D_INSTANCES", "children")
    assert units_wanted(True) is False
