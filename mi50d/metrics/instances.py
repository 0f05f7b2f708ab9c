"""Instance series, from a snapshot of the supervisor taken at scrape time (`InstanceView`).

The snapshot (each instance's status as the control socket reports it, and its configuration)
is taken on the event loop in one go and costs no I/O; the VRAM each process holds (the KFD's
per-process files) and the estimate are read from the worker thread that renders the scrape.
Nothing is kept between scrapes. The estimate is the preflight formula
(`mi50d.host.vram.estimate`) on the model's GGUF header, which `mi50d.host.ggufmeta` caches by
file identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mi50d.config import InstanceConfig
from mi50d.control.protocol import InstanceStatus
from mi50d.engine.states import ALIVE, State
from mi50d.engine.supervisor import Supervisor, status_of
from mi50d.host.ggufmeta import GGUFError, GGUFInfo, read_gguf
from mi50d.host.gpumem import gpu_indices, process_vram
from mi50d.host.gpus import Gpu
from mi50d.host.preflight import expects_gpu
from mi50d.host.vram import estimate
from mi50d.metrics.gpus import gpu_label

_STATES = [str(s) for s in State]


@dataclass(frozen=True)
class InstanceView:
    status: InstanceStatus
    config: InstanceConfig


def snapshot(supervisor: Supervisor) -> list[InstanceView]:
    """Every instance's status (VRAM left out) and configuration, as of now; no I/O, so it is
    cheap on the event loop, where it must run."""
    views = []
    for name in supervisor.names():
        inst = supervisor.get(name)
        views.append(InstanceView(status_of(inst, {}), inst.config))
    return views


# Estimates by (config, header, GPU count, mmproj size): the formula walks every tensor of the
# header (~1 ms for a 32B model), and neither input changes between scrapes. The entries hold the
# config and header objects, so their ids stay theirs while cached.
_ESTIMATES: dict[tuple[int, int, int, int], tuple[InstanceConfig, GGUFInfo, int]] = {}
_ESTIMATES_SIZE = 256


def vram_estimate(conf: InstanceConfig, gpus: Sequence[Gpu]) -> int | None:
    """Bytes the instance is expected to need on its GPUs; None if its model cannot be read."""
    if conf.model is None:  # an rpc-worker: its VRAM is its clients' to plan
        return None
    try:
        model = read_gguf(conf.model)  # remembered by file identity in ggufmeta
        mmproj = conf.mmproj.stat().st_size if conf.mmproj is not None else 0
    except (OSError, GGUFError):
        return None
    n_gpus = len(conf.gpus if conf.gpus is not None else gpus) if expects_gpu(conf) else 0
    key = (id(conf), id(model), n_gpus, mmproj)
    known = _ESTIMATES.get(key)
    if known is not None:
        return known[2]
    total = estimate(conf, model, mmproj, n_gpus=n_gpus).total
    if len(_ESTIMATES) >= _ESTIMATES_SIZE:
        _ESTIMATES.clear()
    _ESTIMATES[key] = (conf, model, total)
    return total


def instance_families(views: Sequence[InstanceView], gpus: Sequence[Gpu],
                      sysfs_root: Path) -> Iterable[Metric]:
    state = GaugeMetricFamily(
        "mi50d_instance_state", "1 for the instance's current state, 0 for the others (stopped, "
        "starting, running, unhealthy, backoff, stopping, failed)", labels=["instance", "state"])
    up = GaugeMetricFamily("mi50d_instance_up", "1 while the instance is running (its last "
                           "health probe answered 200), else 0", labels=["instance"])
    restarts = CounterMetricFamily("mi50d_instance_restarts", "Restarts by the restart policy "
                                   "since mi50d started the instance (a reload that changes it "
                                   "starts again from 0)", labels=["instance"])
    vram = GaugeMetricFamily("mi50d_instance_vram_bytes", "VRAM the instance's process holds on "
                             "each GPU, from the KFD's per-process files",
                             labels=["instance", "gpu"])
    guess = GaugeMetricFamily("mi50d_instance_vram_estimate_bytes", "VRAM the instance needs on "
                              "its GPUs by mi50d's estimate from the model's GGUF header",
                              labels=["instance"])
    labels = {g.index: gpu_label(g) for g in gpus}
    alive = any(v.status.pid is not None for v in views)
    indices = gpu_indices(sysfs_root) if gpus and alive else {}
    for view in views:
        st = view.status
        for s in _STATES:
            state.add_metric([st.name, s], 1 if st.state == s else 0)
        up.add_metric([st.name], 1 if st.state == State.RUNNING else 0)
        restarts.add_metric([st.name], st.restarts)
        if st.pid is not None and st.state in ALIVE and indices:
            for index, held in sorted(process_vram(sysfs_root, st.pid, indices).items()):
                vram.add_metric([st.name, labels.get(index, str(index))], held)
        needed = vram_estimate(view.config, gpus)
        if needed is not None:
            guess.add_metric([st.name], needed)
    return [state, up, restarts, vram, guess]
