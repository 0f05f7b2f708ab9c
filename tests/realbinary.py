"""Where the real llama-server build is, for tests that run it; they skip when there is none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CACHE = Path.home() / ".cache" / "mi50d"


def llama_server() -> Path:
    """$MI50D_TEST_LLAMA_SERVER, else the newest ~/.cache/mi50d/llama-*/current/bin/llama-server."""
    explicit = os.environ.get("MI50D_TEST_LLAMA_SERVER")
    candidates = [Path(explicit)] if explicit else sorted(
        CACHE.glob("llama-*/current/bin/llama-server"), key=lambda p: p.stat().st_mtime,
        reverse=True)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    pytest.skip("no llama-server build (tests/conftest.py builds one; or set "
                "MI50D_TEST_LLAMA_SERVER)")
