"""The supervision engine: one state machine per llama-server (`instance`), the set of them and
reloads (`supervisor`), the one place that forks (`process`), health probes, the restart policy,
the state table and the event hub.

May import: `mi50d.host` (preflight and diagnosis hooks, VRAM, accounts), and the leaves
`mi50d.config`, `mi50d.control.protocol` (status models). Never `mi50d.control` otherwise,
`mi50d.daemon` or `mi50d.cli`.
"""
