"""GPU telemetry in `mi50ctl status`, read by the daemon from sysfs (here the recorded tree of a
host with a 16 GB and a 32 GB MI50)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ctlsupport import running_daemon, server_instance
from tests.support import free_port

pytestmark = pytest.mark.llama

SYSFS = Path(__file__).parent / "fixtures" / "hosts" / "two-mi50" / "sys"


def test_status_shows_each_gpu_with_units(request: pytest.FixtureRequest) -> None:
    host = {"sysfs_root": str(SYSFS)}
    with running_daemon({"host": host}, {"tiny": server_instance(request, free_port())}) as d:
        text = d.ctl("status")
        lines = text.stdout.splitlines()
        at = lines.index(next(line for line in lines if line.startswith("GPU ")))
        assert lines[at].split() == ["GPU", "GFX", "VRAM", "USED/TOTAL", "BUSY",
                                     "EDGE/JUNCTION/MEM", "POWER"]
        assert lines[at + 1].split() == ["0", "gfx906", "13.5/16.0", "GiB", "97%", "61/78/70",
                                         "°C", "187", "W"]
        assert lines[at + 2].split() == ["1", "gfx906", "1.1/32.0", "GiB", "0%", "34/35/32",
                                         "°C", "21", "W"]
        doc = json.loads(d.ctl("status", "--json").stdout)
        first = doc["gpus"][0]
        assert (first["index"], first["vram_total"], first["temperatures_c"]["junction"]) == (
            0, 17163091968, 78.0)
        # A single-instance view stays a single row.
        assert "GPU " not in d.ctl("status", "tiny").stdout
