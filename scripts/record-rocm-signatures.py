#!/usr/bin/env python3
"""Run every case of tests/systemd/rocm_signatures.py against the real HIP build in the sid ROCm
root and (re)write its REAL fixture in tests/fixtures/rocm-signatures/; print what each gave.

    scripts/record-rocm-signatures.py [CASE ...]

Builds the root and the HIP build first if they are not cached (see tests/systemd/hip_build.py).
The `expect` line is the diagnosis mi50d.host.diagnose gives the output now: read the diff.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mi50d.host.diagnose import diagnose  # noqa: E402
from mi50d.llama import source as llamasrc  # noqa: E402
from mi50d.llama import tinymodel  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.systemd import hip_build, rootfs  # noqa: E402
from tests.systemd import rocm_signatures as sigs  # noqa: E402


def main(names: list[str]) -> int:
    source = llamasrc.ensure_source()
    hip = hip_build.build_llama(source, REPO)
    if hip.returncode != 0:
        sys.stderr.write(hip.output[-4000:])
        return 1
    model = tinymodel.cached(llamasrc.cache_root() / "models", source / tinymodel.VOCAB_FILE)
    versions = rootfs.package_versions(hip.root, ("libamdhip64-7", "librocblas5",
                                                  "libhsa-runtime64-1"))
    record = json.loads((hip.bin_dir.parent / "build.json").read_text())
    llama = str(record["version"]).splitlines()[0].removeprefix("version: ")
    produced = (f"Debian sid + experimental: {', '.join(f'{k} {v}' for k, v in versions.items())};"
                f" llama.cpp {llama}; no GPU, no amdgpu driver; timestamps removed, port shown "
                "as PORT")
    for case in sigs.CASES:
        if names and case.name not in names:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            lines = sigs.run(case, hip, source, REPO, model, free_port(), Path(scratch))
        codes = [d.code for d in diagnose(lines)]
        path = sigs.write(case, produced, codes, lines)
        sys.stdout.write(f"{case.name}: {', '.join(codes) or 'none'} ({len(lines)} lines) -> "
                         f"{path.relative_to(REPO)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
