"""A daemon for the metrics benchmarks: the Supervisor and `GET /metrics` on loopback, wired the
way mi50d/metrics/routes.py tells the daemon to (until the gateway's listener exists).

    python -m bench.metrics_daemon CONFIG_DIR PORT     prints `metrics_ready` once serving
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from mi50d.config import load_config
from mi50d.engine.supervisor import Supervisor
from mi50d.host.accounts import account_for
from mi50d.metrics.exporter import Exporter
from mi50d.metrics.routes import metrics_routes


async def serve(directory: Path, port: int) -> None:
    config = load_config(directory)
    sup = Supervisor(config, account_for(config))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with asyncio.TaskGroup() as tg:
        sup.launch(tg)
        async with Exporter(sup) as exp:
            app = web.Application()
            app.add_routes(metrics_routes(exp))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            print("metrics_ready", flush=True)
            await stop.wait()
            await runner.cleanup()
        await sup.shutdown()


if __name__ == "__main__":
    uvloop.run(serve(Path(sys.argv[1]), int(sys.argv[2])))
