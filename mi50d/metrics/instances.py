"""Instance series, from a snapshot of the supervisor taken at scrape time (`InstanceView`).

The snapshot is the supervisor's own `status()` (with the VRAM the KFD says each process holds)
and each instance's configuration, taken on the event loop in one go; nothing is kept between
scrapes. The VRAM estimate is the preflight formula (`mi50d.host.vram.estimate`) on the model's
GGUF header, which `mi50d.host.ggufmeta` caches by file identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mi50d.config import InstanceConfig
from mi50d.control.protocol import InstanceStatus
from mi50d.engine.states import State
from mi50d.engine.supervisor import Supervisor
from mi50d.host.ggufmeta import GGUFError, read_gguf
from mi50d.host.gpus import Gpu
from mi50d.host.preflight import expects_gpu
from mi50d.host.vram import estimate
from mi50d.metrics.gpus import gpu_label


@dataclass(frozen=True)
class InstanceView:
    status: InstanceStatus
    config: InstanceConfig


def snapshot(supervisor: Supervisor) -> list[InstanceView]:
    """Every instance's status and configuration, as of now (call on the event loop)."""
    return [InstanceView(st, supervisor.get(st.name).config) for st in supervisor.status()]


def vram_estimate(conf: InstanceConfig, gpus: Sequence[Gpu]) -> int | None:
    """Bytes the instance is expected to need on its GPUs; None if its model cannot be read."""
    try:
        model = read_gguf(conf.model)
        mmproj = conf.mmproj.stat().st_size if conf.mmproj is not None else 0
    except (OSError, GGUFError):
        return None
    n_gpus = len(conf.gpus if conf.gpus is not None else gpus) if expects_gpu(conf) else 0
    return estimate(conf, model, mmproj, n_gpus=n_gpus).total


def instance_families(views: Sequence[InstanceView], gpus: Sequence[Gpu]) -> Iterable[Metric]:
    state = GaugeMetricFamily(
        "mi50d_instance_state", "1 for the instance's current state, 0 for the others (stopped, "
        "starting, running, unhealthy, backoff, stopping, failed)", labels=["instance", "state"])
    up = GaugeMetricFamily("mi50d_instance_up", "1 while the instance is running (its last "
                           "health probe answered 200), else 0", labels=["instance"])
    restarts = CounterMetricFamily("mi50d_instance_restarts", "Restarts by the restart policy "
                                   "since mi50d started the instance (a reload that changes it "
                                   "starts again from 0)", labels=["instance"])
    vram = GaugeMetricFamily("mi50d_instance_vram_bytes", "VRAM the instance's process holds on "
                             "each GPU, from the KFD (else from the buffer sizes it logged)",
                             labels=["instance", "gpu"])
    guess = GaugeMetricFamily("mi50d_instance_vram_estimate_bytes", "VRAM the instance needs on "
                              "its GPUs by mi50d's estimate from the model's GGUF header",
                              labels=["instance"])
    labels = {g.index: gpu_label(g) for g in gpus}
    for view in views:
        st = view.status
        for s in State:
            state.add_metric([st.name, str(s)], 1 if st.state == s else 0)
        up.add_metric([st.name], 1 if st.state == State.RUNNING else 0)
        restarts.add_metric([st.name], st.restarts)
        for index, held in sorted(st.vram.items()):
            vram.add_metric([st.name, labels.get(index, str(index))], held)
        needed = vram_estimate(view.config, gpus)
        if needed is not None:
            guess.add_metric([st.name], needed)
    return [state, up, restarts, vram, guess]
