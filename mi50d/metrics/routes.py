"""The aiohttp route for the gateway's listener: `GET /metrics` in the Prometheus text format.

Wiring (daemon, at merge): `async with Exporter(supervisor) as exporter:` inside serve(), hand
`metrics_routes(exporter)` to the gateway's app factory as `extra_routes` and `exporter.gateway`
to it as its observer; the `async with` closes the upstream session after the gateway stops.
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
