"""mi50d: a supervisor for llama.cpp's llama-server on AMD Instinct MI50 (gfx906) GPUs.

The top holds the entry (`cli`), the wiring of one daemon (`daemon`: signals, supervisor, control
socket and systemd in one TaskGroup), the configuration (`config`, a leaf everyone may import) and
the systemd adapter (`systemd`). Below it, imports point one way:

    cli, daemon  ->  control, gateway, metrics  ->  engine  ->  host, llama  ->  leaves

(the leaves: config, configtypes, control.protocol, host.checks)

`tests/test_layout.py` fails on an upward import or a cycle.
"""

from __future__ import annotations

__version__ = "0.1.0"
