"""The demo's config directory is one the real `mi50d --check-config` accepts, on the cached build."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from mi50d.llama import demo


@pytest.mark.llama
def test_demo_config_is_accepted(tmp_path: Path, llama_server: Path, tiny_model: Path) -> None:
    directory = demo.write_config(tmp_path / "demo", llama_server, tiny_model)
    mi50d = Path(sys.executable).parent / "mi50d"
    done = subprocess.run([str(mi50d), "--config-dir", str(directory), "--check-config", "--json"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert resolved["daemon"]["user"] == pwd.getpwuid(os.geteuid()).pw_name
    assert resolved["daemon"]["socket"] == str(demo.socket_path())
    tiny = resolved["instances"][demo.INSTANCE]
    assert tiny["autostart"] is True
    assert tiny["argv"] == [str(llama_server), "--model", str(tiny_model), "--host", "127.0.0.1",
                            "--port", "8090", "--ctx-size", "512", "--n-gpu-layers", "0", "--alias", "tiny",
                            "--metrics"]
