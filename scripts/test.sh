#!/usr/bin/env bash
# Everything CI checks: setup, then the llama.cpp source, the cached cpu llama-server build and the
# tiny model (prepared here, before pytest, so a fresh build's minutes of cmake output stream to
# the terminal instead of landing inside a test), then ruff, mypy and pytest.
# Exits non-zero if any step fails; pytest finding no tests (its exit 5) is a failure too.
set -uo pipefail
cd "$(dirname "$0")/.."

step() { echo "== $*" >&2; }
failed=()

step setup
bash scripts/setup.sh || exit 1

step "llama.cpp source, cpu llama-server build (cached after the first), tiny model"
.venv/bin/python -m mi50d.llama.demo >/dev/null || exit 1
step "the cpu build with llama.cpp's RPC server, for the RPC tests (cached after the first)"
.venv/bin/python -m mi50d.llama.demo --rpc >/dev/null || exit 1

step "ruff check"
.venv/bin/ruff check . || failed+=(ruff)

step mypy
.venv/bin/mypy || failed+=(mypy)

step pytest
.venv/bin/pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests" >&2
fi
[ "$rc" -eq 0 ] || failed+=("pytest (exit $rc)")

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all checks passed" >&2
