"""The swap planner as tables: (need, GPUs, holders) -> victims, or why it cannot fit."""

from __future__ import annotations

import pytest

from mi50d.gateway.plan import GpuMemory, Holder, plan

G = 1 << 30


def gpus(*spec: tuple[int, int]) -> dict[int, GpuMemory]:
    """GPU i: (total GiB, used GiB)."""
    return {i: GpuMemory(total * G, used * G) for i, (total, used) in enumerate(spec)}


def h(name: str, gib_on: dict[int, int], evictable: bool = True, in_flight: int = 0,
      last_used: float = 0.0) -> Holder:
    return Holder(name, {i: n * G for i, n in gib_on.items()}, evictable, in_flight, last_used)


CASES = [
    # id, need per GPU (GiB), GPUs, holders, victims (None: does not fit)
    ("fits as it is", {0: 10}, gpus((32, 15)), [h("a", {0: 15})], ()),
    ("guide: 32B needs what gpt-oss holds", {0: 29}, gpus((32, 15)), [h("gpt", {0: 15})],
     ("gpt",)),
    ("idle before busy", {0: 14}, gpus((32, 30)),
     [h("busy", {0: 15}, in_flight=2), h("idle", {0: 15}, last_used=9.0)], ("idle",)),
    ("busy when only busy frees enough", {0: 20}, gpus((32, 30)),
     [h("busy", {0: 20}, in_flight=1), h("idle", {0: 10})], ("busy",)),
    ("fewest instances before fewest bytes", {0: 12}, gpus((32, 30)),
     [h("big", {0: 20}), h("s1", {0: 5}), h("s2", {0: 5})], ("big",)),
    ("fewest bytes among single victims", {0: 12}, gpus((32, 30)),
     [h("big", {0: 20}), h("mid", {0: 10})], ("mid",)),
    ("least recently used among equals", {0: 12}, gpus((32, 30)),
     [h("new", {0: 15}, last_used=20.0), h("old", {0: 15}, last_used=10.0)], ("old",)),
    ("two victims when one is not enough", {0: 25}, gpus((32, 30)),
     [h("a", {0: 12}), h("b", {0: 12}), h("c", {0: 6})], ("a", "b")),
    ("never a non-on-demand instance", {0: 20}, gpus((32, 30)),
     [h("pinned", {0: 20}, evictable=False), h("od", {0: 10})], None),
    ("holders on another GPU do not help", {0: 20}, gpus((32, 30), (32, 20)),
     [h("a", {1: 20}), h("b", {0: 10})], None),
    ("a two-GPU instance: room on both", {0: 8, 1: 8}, gpus((16, 14), (16, 14)),
     [h("left", {0: 7}), h("right", {1: 7}), h("both", {0: 7, 1: 7})], ("both",)),
    ("other processes' VRAM counts", {0: 10}, gpus((16, 12)), [h("a", {0: 4})], None),
    ("loading instance not yet in sysfs used", {0: 10}, gpus((16, 0)),
     [h("loading", {0: 10}, evictable=False)], None),
    ("unknown total: no planning", {0: 10}, {0: GpuMemory(None, None)}, [h("a", {0: 1})], ()),
]


@pytest.mark.parametrize(("need", "gpu_mem", "holders", "victims"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(need: dict[int, int], gpu_mem: dict[int, GpuMemory], holders: list[Holder],
              victims: tuple[str, ...] | None) -> None:
    result = plan({i: n * G for i, n in need.items()}, gpu_mem, holders)
    if victims is None:
        assert not result.fits and result.reason
    else:
        assert result.fits and result.victims == victims


def test_no_fit_names_what_holds_the_gpu() -> None:
    result = plan({0: 20 * G}, gpus((32, 30)),
                  [h("pinned", {0: 20}, evictable=False), h("od", {0: 6})])
    assert not result.fits
    assert "needs ~20.0 GiB on GPU 0" in result.reason
    assert "pinned holds 20.0 GiB (not on demand" in result.reason
    assert "od holds 6.0 GiB" in result.reason
    assert "other processes hold 4.0 GiB" in result.reason
    assert "only 8.0 GiB would be free" in result.reason


def test_many_candidates_fall_back_to_greedy_and_still_fit() -> None:
    holders = [h(f"m{i:02d}", {0: 1}, last_used=float(i)) for i in range(20)]
    result = plan({0: 3 * G}, gpus((20, 20)), holders)
    assert result.fits and result.victims == ("m00", "m01", "m02")  # the three least recent
