"""`python -m bench.ggufread`: mi50d's GGUF header reader (issue #10's bounds) against the `gguf`
package's reader (numpy, memory-mapped) as the baseline, on the same files in the same run: a
Qwen-size vocabulary (151,936 tokens) and crafted headers of ~100 MB. Prints time and the peak of
traced Python allocations (the memory-mapped file is not traced, so the baseline's peak is its
parsed structures only). The baseline runs once per file (it takes seconds), mi50d five times
(the median). A figure, never an assertion. The landed reader (before #10) took 424 s and 897 MiB
on the crafted file under tracemalloc.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import gguf

from mi50d.host import ggufmeta
from tests.ggufwriter import STRING, U8, raw_array, raw_kv, raw_string, write_model, write_raw

REPS = 5


def _measure(read: Callable[[], object], reps: int) -> tuple[float, float, str]:
    """(median seconds untraced, peak MiB traced, outcome)."""
    times, outcome = [], "ok"
    for _ in range(reps):
        ggufmeta._CACHE.clear()
        start = time.perf_counter()
        try:
            read()
        except Exception as exc:  # a figure for each reader, whatever the other does
            outcome = type(exc).__name__
        times.append(time.perf_counter() - start)
    ggufmeta._CACHE.clear()
    tracemalloc.start()
    with contextlib.suppress(Exception):  # already reported above
        read()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return statistics.median(times), peak, outcome


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    tokens = b"".join(raw_string(b"%016d" % i) for i in range(262_144))
    cases = {
        "qwen-size vocabulary model": write_model(work / "m.gguf", n_vocab=151_936, n_embd=64,
                                                  n_head=4, n_head_kv=2),
        "262k-token vocabulary": write_raw(work / "v.gguf", [
            raw_kv("tokenizer.ggml.tokens", 9, raw_array(STRING, 262_144, tokens))]),
        "crafted 100 MB u8 array": write_raw(work / "u8.gguf", [
            raw_kv("junk", 9, raw_array(U8, 100 << 20))], hole=100 << 20),
    }
    print(f"{'file':28s} {'reader':8s} {'median':>9s} {'peak':>10s}  outcome")
    for name, path in cases.items():
        for label, read, reps in (("mi50d", lambda p=path: ggufmeta.read_gguf(p), REPS),
                                  ("gguf-py", lambda p=path: gguf.GGUFReader(p), 1)):
            if label == "gguf-py" and name.startswith("crafted"):
                print(f"{name:28s} {label:8s} (not run: it parses all 100M items, for minutes)")
                continue
            seconds, peak, outcome = _measure(read, reps)
            print(f"{name:28s} {label:8s} {seconds * 1000:7.1f} ms {peak:6.1f} MiB  {outcome}")


if __name__ == "__main__":
    main()
