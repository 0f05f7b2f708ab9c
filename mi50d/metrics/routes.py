"""The aiohttp route for the gateway's listener: `GET /metrics` in the Prometheus text format.

Wiring in `daemon.serve` (the lead's, at merge): `exporter = Exporter(supervisor)` and
`GatewayService(..., observer=exporter.gateway, extra_routes=metrics_routes(exporter))`; enter
`async with exporter:` before `gateway.open()` and leave it after `gateway.close()`.
"""

from __future__ import annotations

import math

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from mi50d.metrics.exporter import Exporter

# Prometheus says how long it waits for this scrape; the upstream fetches get this share of it,
# leaving the rest for rendering and the way back.
SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
UPSTREAM_SHARE = 0.8


def metrics_routes(exporter: Exporter) -> list[web.RouteDef]:
    # The classic text format (0.0.4): what generate_latest writes, read by every Prometheus 2.x.
    async def metrics(request: web.Request) -> web.Response:
        body = await exporter.render(upstream_timeout(request.headers.get(SCRAPE_TIMEOUT_HEADER)))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    return [web.get("/metrics", metrics)]


def upstream_timeout(header: str | None) -> float | None:
    """The upstream fetches' share of the scraper's timeout; None (the exporter's own) when the
    header is missing or not a positive number."""
    try:
        seconds = float(header) if header is not None else 0.0
    except ValueError:
        return None
    return seconds * UPSTREAM_SHARE if seconds > 0 and math.isfinite(seconds) else None
