#!/usr/bin/env python3
"""Build (or find) a cached Debian root the tests use, and print where it is and what it cost.

    scripts/build-root.py sid-rocm | bookworm | trixie
    scripts/build-root.py hip-llama     # the sid-rocm root, then the HIP llama.cpp build in it
    scripts/build-root.py deb-trixie    # mi50d's .deb for trixie (built in a trixie build root)

Run as root from the repository (debootstrap and systemd-nspawn need it); CI can call it ahead
of pytest, and a person can warm the cache. The tests build the same artefacts on first use.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mi50d.llama import source as llamasrc  # noqa: E402
from tests.systemd import debbuild, hip_build, nspawn_harness, rootfs  # noqa: E402
from tests.systemd.rocm_root import RECIPE as ROCM  # noqa: E402


def main(argv: list[str]) -> int:
    recipes = {"sid-rocm": ROCM, **{s: nspawn_harness.recipe(s) for s in nspawn_harness.SUITES}}
    debs = {f"deb-{s}" for s in nspawn_harness.SUITES}
    if len(argv) != 1 or argv[0] not in (*recipes, "hip-llama", *debs):
        sys.stderr.write(f"usage: build-root.py {{{'|'.join([*recipes, 'hip-llama', *debs])}}}\n")
        return 2
    started = time.monotonic()
    if argv[0] in debs:
        deb = debbuild.build_deb(REPO, argv[0].removeprefix("deb-"))
        sys.stdout.write(json.dumps({"deb": str(deb),
                                     "this_call_s": round(time.monotonic() - started, 1)}) + "\n")
        return 0
    if argv[0] == "hip-llama":
        done = hip_build.build_llama(llamasrc.ensure_source(), REPO)
        sys.stdout.write(done.output[-3000:])
        sys.stdout.write(json.dumps({"build_root": str(done.build_root), "rc": done.returncode,
                                     "elapsed_s": done.elapsed_s}) + "\n")
        return 0 if done.returncode == 0 else 1
    root = rootfs.cached_root(recipes[argv[0]])
    sys.stdout.write(json.dumps({"root": str(root), "timings": rootfs.record(root)["timings"],
                                 "this_call_s": round(time.monotonic() - started, 1)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
