#!/usr/bin/env bash
# Run the supervision benchmarks (issue #7) from the repository root with the dev venv:
#   bash bench/run.sh           full run (~10 min on 2 cores), writes BENCHMARKS.md
#   bash bench/run.sh --quick   smoke run (~1-2 min)
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m bench "$@"
