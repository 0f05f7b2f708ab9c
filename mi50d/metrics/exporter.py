"""`Exporter`: everything `GET /metrics` answers, read when scraped.

A scrape (1) snapshots the supervisor on the event loop, (2) fetches the running instances'
own /metrics in parallel, each under a short timeout, then (3) in a worker thread reads the GPUs
from sysfs, parses the upstream answers and renders the text with prometheus_client. The
daemon's state is read, not copied: only the event histograms, the gateway's series and the
upstream error counter live here, as prometheus_client metrics in this exporter's registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from prometheus_client import (
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import Metric

from mi50d.engine.states import State
from mi50d.engine.supervisor import Supervisor
from mi50d.host.gpus import list_gpus
from mi50d.metrics.engine import EngineMetrics
from mi50d.metrics.gateway import GatewayMetrics
from mi50d.metrics.gpus import gpu_families
from mi50d.metrics.instances import InstanceView, instance_families, snapshot
from mi50d.metrics.upstream import DEFAULT_TIMEOUT_S, Fetched, Target, Upstream

SCRAPED_STATES = (State.RUNNING, State.UNHEALTHY)


class Exporter:
    """The metrics of one daemon. Sets `supervisor.observe`; use as `async with` (the upstream
    client session lives as long as the block)."""

    def __init__(self, supervisor: Supervisor, upstream_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        # Process-wide in prometheus_client: `*_created` samples are separate series to
        # Prometheus 2.x (one more per counter and histogram child); nothing here needs them.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
        self.supervisor = supervisor
        self.registry = CollectorRegistry(auto_describe=False)
        self.engine = EngineMetrics(self.registry)
        self.gateway = GatewayMetrics(self.registry)
        self.upstream = Upstream(self.registry, upstream_timeout_s)
        ProcessCollector(registry=self.registry)  # the daemon's own CPU, memory and fds
        supervisor.observe = self.engine.observe

    async def __aenter__(self) -> Exporter:
        await self.upstream.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.upstream.__aexit__(*exc)

    async def render(self, upstream_timeout_s: float | None = None) -> bytes:
        """The Prometheus text format of everything, as of now; upstream fetches wait at most
        `upstream_timeout_s` (default: the exporter's)."""
        views = snapshot(self.supervisor)
        names = [v.status.name for v in views]
        self.engine.forget_all_but(names)
        self.upstream.forget_all_but(names)
        fetched = await self.upstream.fetch_all(upstream_targets(views), upstream_timeout_s)
        return await asyncio.to_thread(generate_latest, _Scrape(self, views, fetched))


def upstream_targets(views: Sequence[InstanceView]) -> list[Target]:
    """The instances whose own /metrics are read: running (or unhealthy), `metrics = true`."""
    return [Target(v.status.name, f"{v.config.endpoint()}/metrics", v.config.api_key_file)
            for v in views if v.config.metrics and not v.config.is_worker
            and v.status.state in SCRAPED_STATES]


class _Scrape:
    """One scrape's collector: reads sysfs and renders the snapshot; run in a worker thread."""

    def __init__(self, exporter: Exporter, views: Sequence[InstanceView],
                 fetched: Sequence[Fetched]) -> None:
        self._exporter = exporter
        self._views = views
        self._fetched = fetched

    def collect(self) -> Iterable[Metric]:
        exp = self._exporter
        host = exp.supervisor.config.daemon.host
        gpus = list_gpus(host)
        upstream = exp.upstream.relabel(self._fetched)  # counts parse errors before they are read
        yield from instance_families(self._views, gpus, host.sysfs_root)
        yield from gpu_families(gpus)
        yield from exp.registry.collect()
        yield from upstream
