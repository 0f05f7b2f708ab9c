"""The supervision engine: one state machine and owner loop per llama-server (`instance`), what a
request asks of it and when the reply is due (`desired`: read this first), the pieces of one
attempt (`run`), the set of them and reloads (`supervisor`), the one place that forks
(`process`), kept output (`output`), health probes, the restart policy, the state table and the
event hub.

May import: `mi50d.host` (preflight and diagnosis hooks, VRAM, accounts), and the leaves
`mi50d.config`, `mi50d.control.protocol` (status models). Never `mi50d.control` otherwise,
`mi50d.daemon` or `mi50d.cli`.
"""
