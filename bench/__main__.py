"""`python -m bench [--quick] [--out BENCHMARKS.md]`: run every section, print the table, write
the report. A section that breaks is reported as broken and the others still run."""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench import control, idle, ready, request, respawn, scale
from bench.models import Models, make_models
from bench.report import machine, write_report
from bench.stats import Row, text_table

LOAD_S = 300.0  # the longest a model may take to load before a section gives up


@dataclass(frozen=True)
class Plan:
    ready_tiny: int
    ready_large: int
    crash: int
    hang: int
    hang_configs: tuple[dict[str, float], ...]
    blocks: int
    per_block: int
    counts: tuple[int, ...]
    ctl_process: int
    idle_s: float
    idle_windows: int
    scale_count: int
    scale_reps: int
    requests: int


FULL = Plan(ready_tiny=12, ready_large=5, crash=16, hang=8,
            hang_configs=({"interval_s": 0.5, "timeout_s": 0.5, "failures": 2},
                          {"interval_s": 0.5, "timeout_s": 0.1, "failures": 3}),
            blocks=5, per_block=200, counts=(1, 16, 64), ctl_process=10, idle_s=60, idle_windows=6,
            scale_count=64, scale_reps=6, requests=40)
QUICK = Plan(ready_tiny=2, ready_large=1, crash=3, hang=2, hang_configs=FULL.hang_configs[:1],
             blocks=3, per_block=50, counts=(1, 16, 64), ctl_process=3, idle_s=20, idle_windows=4,
             scale_count=64, scale_reps=1, requests=6)


def sections(plan: Plan, models: Models, work: Path) -> list[tuple[str, Callable[[], list[Row]]]]:
    tiny, large, big = models.tiny, models.large, models.large_label
    largs = models.large_args if large is not None else ()
    out: list[tuple[str, Callable[[], list[Row]]]] = [
        ("1 ready, tiny, in-process", lambda: uvloop.run(
            ready.run_inproc(work, tiny, "tiny", plan.ready_tiny, LOAD_S))),
        ("1 ready, tiny, in-process, preflight", lambda: uvloop.run(
            ready.run_inproc(work, tiny, "tiny", plan.ready_tiny, LOAD_S, preflight=True))),
        (f"1 ready, {big}, in-process", lambda: uvloop.run(
            ready.run_inproc(work, large, big, plan.ready_large, LOAD_S, largs))),
    ]
    if control.ctl_has("start"):
        out += [
            ("1 ready, tiny, mi50ctl", lambda: ready.run_mi50ctl(
                work, tiny, "tiny", plan.ready_tiny, LOAD_S)),
            (f"1 ready, {big}, mi50ctl", lambda: ready.run_mi50ctl(
                work, large, big, plan.ready_large, LOAD_S, largs)),
        ]
    out += [
        ("2 respawn", lambda: respawn.crash_rows(work, tiny, "tiny", plan.crash, LOAD_S)),
        ("2 respawn, preflight", lambda: respawn.crash_rows(
            work, tiny, "tiny", plan.crash, LOAD_S, preflight=True)),
        ("3 hang", lambda: [row for cfg in plan.hang_configs for row in respawn.hang_rows(
            work, tiny, "tiny", plan.hang, LOAD_S, cfg)]),
        ("4 control socket", lambda: control.socket_rows(
            work, list(plan.counts), plan.blocks, plan.per_block)),
    ]
    if control.ctl_has("status"):
        out.append(("4 mi50ctl process", lambda: control.process_rows(work, plan.ctl_process)))
    out += [
        ("5 idle", lambda: idle.run(work, 16, plan.idle_s, plan.idle_windows)),
        ("6 scale", lambda: uvloop.run(scale.run(work, plan.scale_count, plan.scale_reps))),
    ]
    if tiny is not None:  # the fake server has no /completion
        out.append(("7 request", lambda: request.run(work, tiny, plan.requests, LOAD_S)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"),
                        help="the report to write (default: BENCHMARKS.md); '-' for none")
    parser.add_argument("--fake", action="store_true",
                        help="the fake server stands in for llama-server (to try the harness)")
    parser.add_argument("--only", default="",
                        help="run only sections whose name starts with one of these, e.g. 1,5")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    command = " ".join(["python -m bench", *(a for a in ("--quick", "--fake") if getattr(
        args, a[2:]))])
    started = time.monotonic()
    rows: list[Row] = []
    broken: list[str] = []
    timings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mi50d-bench-", dir="/tmp") as tmp:
        work = Path(tmp)
        print("models (generated on first use) ...", flush=True)
        models = make_models(args.fake, args.quick)
        for name, run in sections(plan, models, work):
            if args.only and not any(name.startswith(p.strip()) for p in args.only.split(",")):
                continue
            print(f"== {name} ...", flush=True)
            t0 = time.monotonic()
            try:
                got = run()
            except Exception as exc:
                broken.append(f"{name}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                continue
            timings.append(f"{name} {time.monotonic() - t0:.0f} s")
            print(text_table(got), flush=True)
            rows += got
    total = time.monotonic() - started
    print("\n" + text_table(rows))
    for row in rows:
        for note in row.notes:
            print(f"  [{row.section} / {row.figure}] {note}")
    for line in broken:
        print(f"BROKEN {line}")
    print(f"\ntotal {total:.0f} s ({'; '.join(timings)})")
    if str(args.out) != "-":
        facts = machine()
        facts["models"] = models.describe
        facts["wall time"] = f"{total:.0f} s"
        write_report(args.out, rows, broken, facts, command,
                     datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"))
        print(f"wrote {args.out}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
