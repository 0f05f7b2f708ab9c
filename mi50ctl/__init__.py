"""mi50ctl: the command-line client of mi50d (and the llama.cpp build tool)."""

from __future__ import annotations
