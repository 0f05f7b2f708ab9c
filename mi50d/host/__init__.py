"""Host checks: what must be true of this machine before a llama-server can start and what went
wrong after it stopped. Preflight and `doctor`, mounts and mount units, GPUs from sysfs and the
KFD, per-process VRAM, the VRAM estimate and the GGUF header reader, file access as the service
account, accounts, and the diagnosis of a failed instance's output (`hooks` is what the engine
calls).

May import: the leaves `mi50d.config` and `mi50d.host.checks` (the `Check` result type), and
other modules of this package. Never the engine, the control plane or the entry.
"""
