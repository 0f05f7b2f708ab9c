"""The swap planner: which running instances to stop so that another one fits. Pure.

Inputs are a snapshot: what the new instance needs per GPU (the preflight estimate), each GPU's
total and used VRAM (sysfs), and every instance that holds VRAM, with what it holds per GPU (the
KFD), whether the gateway may stop it (on demand and not the one being started), its requests in
flight and when it was last used.

Room on a GPU is `total - max(used, sum of holdings)`, as in the preflight check (running
instances already appear in `used`; holdings also cover ones still loading). Stopping a set of
instances adds what they hold to the room of each GPU. Among the sets that make every GPU fit,
the plan takes, in order of preference: the fewest busy instances (idle ones go first), the
fewest instances, the fewest bytes, then the least recently used ones. Busy victims are allowed:
the gateway stops sending them requests and waits for the ones in flight before stopping them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mi50d.host.vram import gib

# Beyond this many candidates the search is greedy instead of exhaustive (2^12 sets is cheap).
EXHAUSTIVE_MAX = 12


@dataclass(frozen=True)
class GpuMemory:
    total: int | None
    used: int | None


@dataclass(frozen=True)
class Holder:
    name: str
    held: Mapping[int, int]  # GPU index -> bytes
    evictable: bool
    in_flight: int = 0
    last_used: float = 0.0  # any clock; smaller is longer ago


@dataclass(frozen=True)
class Plan:
    fits: bool
    victims: tuple[str, ...] = ()
    reason: str = ""  # when it does not fit: what holds the GPU, and how much


def plan(need: Mapping[int, int], gpus: Mapping[int, GpuMemory],
         holders: Sequence[Holder]) -> Plan:
    """What to stop so that `need` (GPU index -> bytes) fits; see the module docstring."""
    deficit: dict[int, int] = {}
    for index, bytes_needed in need.items():
        gpu = gpus.get(index)
        if gpu is None or gpu.total is None or bytes_needed <= 0:
            continue  # unknown size: preflight skips the check too
        held = sum(h.held.get(index, 0) for h in holders)
        room = gpu.total - max(gpu.used or 0, held)
        if bytes_needed > room:
            deficit[index] = bytes_needed - room
    if not deficit:
        return Plan(fits=True)
    candidates = [h for h in holders if h.evictable and any(h.held.get(i) for i in deficit)]
    best = _search(candidates, deficit)
    if best is None:
        return Plan(fits=False, reason=_why_not(need, deficit, gpus, holders))
    return Plan(fits=True, victims=tuple(h.name for h in best))


def _frees_enough(chosen: Sequence[Holder], deficit: Mapping[int, int]) -> bool:
    return all(sum(h.held.get(i, 0) for h in chosen) >= d for i, d in deficit.items())


def _preference(chosen: Sequence[Holder]) -> tuple[object, ...]:
    busy = sum(h.in_flight > 0 for h in chosen)
    freed = sum(sum(h.held.values()) for h in chosen)
    return (busy, len(chosen), freed, sorted(h.last_used for h in chosen),
            sorted(h.name for h in chosen))


def _search(candidates: Sequence[Holder],
            deficit: Mapping[int, int]) -> tuple[Holder, ...] | None:
    if len(candidates) > EXHAUSTIVE_MAX:
        return _greedy(candidates, deficit)
    best: tuple[Holder, ...] | None = None
    for size in range(1, len(candidates) + 1):
        for chosen in itertools.combinations(candidates, size):
            if _frees_enough(chosen, deficit) and (
                    best is None or _preference(chosen) < _preference(best)):
                best = chosen
    return tuple(sorted(best, key=lambda h: h.name)) if best is not None else None


def _greedy(candidates: Sequence[Holder],
            deficit: Mapping[int, int]) -> tuple[Holder, ...] | None:
    chosen: list[Holder] = []
    for h in sorted(candidates, key=lambda h: (h.in_flight > 0, h.last_used, h.name)):
        chosen.append(h)
        if _frees_enough(chosen, deficit):
            return tuple(sorted(chosen, key=lambda h: h.name))
    return None


def _why_not(need: Mapping[int, int], deficit: Mapping[int, int],
             gpus: Mapping[int, GpuMemory], holders: Sequence[Holder]) -> str:
    index = min(deficit)
    gpu = gpus[index]
    assert gpu.total is not None
    here = sorted((h for h in holders if h.held.get(index)), key=lambda h: h.name)
    held = sum(h.held[index] for h in here)
    parts = [f"{h.name} holds {gib(h.held[index])}"
             + ("" if h.evictable else " (not on demand: the gateway never stops it)")
             for h in here]
    outside = (gpu.used or 0) - held
    if outside > 0:
        parts.append(f"other processes hold {gib(outside)}")
    evictable = sum(h.held[index] for h in here if h.evictable)
    room = gpu.total - max(gpu.used or 0, held) + evictable
    holders_text = "; ".join(parts) if parts else "nothing of mi50d's"
    return (f"needs ~{gib(need[index])} on GPU {index}, which has {gib(gpu.total)}: even after "
            f"stopping every on-demand instance there only {gib(max(room, 0))} would be free; "
            f"{holders_text}")
