"""The aiohttp route for the gateway's listener: `GET /metrics` in the Prometheus text format.

Wiring in `daemon.serve` (the lead's, at merge): `exporter = Exporter(supervisor)` and
`GatewayService(..., observer=exporter.gateway, extra_routes=metrics_routes(exporter))`; enter
`async with exporter:` before `gateway.open()` and leave it after `gateway.close()`.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from mi50d.metrics.exporter import Exporter


def metrics_routes(exporter: Exporter) -> list[web.RouteDef]:
    # The classic text format (0.0.4): what generate_latest writes, read by every Prometheus 2.x.
    async def metrics(request: web.Request) -> web.Response:
        body = await exporter.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    return [web.get("/metrics", metrics)]
