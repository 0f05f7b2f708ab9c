"""Preflight's memory of its child checks: an unchanged instance runs no child the second time,
and any change to what a check depends on (the binary, a mode anywhere up the path, a device
node) makes it run again, so every answer stays what a fresh check would say."""

from __future__ import annotations

import os
from pathlib import Path

from mi50d.host.preflight import run_preflight
from mi50d.host.preflightcache import path_stamps
from tests.ggufwriter import write_model
from tests.test_preflight import VIDEO_GID, by_name, daemon, gpu_host, inst, nobody


def counting_binary(path: Path, runs: Path, code: int = 0) -> Path:
    """A llama-server stand-in that notes every run in `runs` (writable by nobody)."""
    runs.touch()
    runs.chmod(0o666)
    path.write_text(f"#!/bin/sh\necho \"$1\" >> {runs}\necho 'version: 1 (test)'\nexit {code}\n")
    path.chmod(0o755)
    return path


def test_unchanged_instance_runs_no_child_and_a_changed_binary_runs_again(world: Path) -> None:
    runs = world / "runs"
    binary = counting_binary(world / "llama-server", runs)
    model = write_model(world / "m.gguf")
    conf = inst(model)
    for _ in range(3):
        checks = by_name(run_preflight(conf, daemon(binary), nobody()))
        assert checks["binary"].status == "ok"
    assert runs.read_text().split() == ["--version"]
    counting_binary(binary, runs)  # rebuilt in place: new mtime and ctime
    run_preflight(conf, daemon(binary), nobody())
    assert runs.read_text().split() == ["--version", "--version"]


def test_a_failed_check_is_never_remembered(world: Path) -> None:
    runs = world / "runs"
    binary = counting_binary(world / "llama-server", runs, code=1)
    model = write_model(world / "m.gguf")
    for _ in range(2):
        assert by_name(run_preflight(inst(model), daemon(binary), nobody()))["binary"].failed
    assert runs.read_text().split() == ["--version", "--version"]


def test_modes_up_the_path_are_checked_again_when_they_change(world: Path) -> None:
    binary = counting_binary(world / "llama-server", world / "runs")
    (world / "models").mkdir()
    model = write_model(world / "models" / "m.gguf")
    conf, cfg = inst(model), daemon(binary)

    def model_check() -> str:
        return by_name(run_preflight(conf, cfg, nobody()))["model"].status

    assert model_check() == "ok"
    model.chmod(0o600)  # the file itself (owned by root)
    assert model_check() == "fail"
    model.chmod(0o644)
    assert model_check() == "ok"
    (world / "models").chmod(0o700)  # a directory above it
    assert model_check() == "fail"
    (world / "models").chmod(0o755)
    assert model_check() == "ok"


def test_device_nodes_are_checked_again_when_their_mode_changes(world: Path) -> None:
    host = gpu_host(world)
    cfg = daemon(counting_binary(world / "s", world / "runs"), host)
    conf = inst(write_model(world / "m.gguf"), n_gpu_layers=None, gpus=[1])

    def access() -> str:
        checks = run_preflight(conf, cfg, nobody(VIDEO_GID), run_binary=False)
        return by_name(checks)["device access"].status

    assert access() == "ok"
    (world / "dev" / "kfd").chmod(0o600)
    assert access() == "fail"
    (world / "dev" / "kfd").chmod(0o660)
    assert access() == "ok"


def test_path_stamps_cover_every_directory_as_written_and_resolved(world: Path) -> None:
    (world / "real").mkdir()
    target = world / "real" / "f"
    target.write_text("x")
    (world / "link").symlink_to(world / "real")
    names = [p for p, _ in path_stamps(world / "link" / "f")]
    for expected in ("/", str(world), str(world / "link"), str(world / "link" / "f"),
                     str(world / "real"), str(target)):
        assert expected in names
    assert os.path.realpath(world / "link" / "f") == str(target)


def test_new_entries_in_the_directories_above_do_not_forget(world: Path) -> None:
    """Adding a file beside the binary or in a directory above it changes their mtime and ctime
    but not who may search them: the remembered answer stands."""
    runs = world / "runs"
    (world / "bin").mkdir()
    binary = counting_binary(world / "bin" / "llama-server", runs)
    conf = inst(write_model(world / "m.gguf"))
    run_preflight(conf, daemon(binary), nobody())
    (world / "bin" / "other").write_text("x")
    (world / "unrelated").mkdir()
    run_preflight(conf, daemon(binary), nobody())
    assert runs.read_text().split() == ["--version"]
    (world / "bin").chmod(0o700)  # but a change of who may search it is seen
    assert by_name(run_preflight(conf, daemon(binary), nobody()))["binary"].failed
