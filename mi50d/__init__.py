"""mi50d: a supervisor for llama.cpp's llama-server on AMD Instinct MI50 (gfx906) GPUs."""

from __future__ import annotations

__version__ = "0.1.0"
