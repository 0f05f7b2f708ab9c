"""Prometheus metrics: what `GET /metrics` serves, read from the daemon's own state at scrape time.

`exporter` (the collector and the scrape), `instances` and `gpus` (series read from the
supervisor and sysfs when scraped), `engine` (histograms fed by the supervisor's observer hook),
`gateway` (`GatewayMetrics`, the gateway's observer), `upstream` (llama-server's own /metrics,
fetched in parallel and relabelled) and `routes` (the aiohttp route the gateway's listener serves).

May import: `mi50d.engine`, `mi50d.host`, and the leaves `mi50d.config`, `mi50d.control.protocol`.
Never `mi50d.gateway` (same rank; the observer protocol is met structurally), `mi50d.control`
otherwise, `mi50d.daemon` or `mi50d.cli`.
"""
